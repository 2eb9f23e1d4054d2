"""Losses against independent transcriptions of the released code and against Hugging Face models."""

import math

import pytest
import torch
import torch.nn.functional as F

from autoregembed_fast import (
    LinearCrossEntropyLoss,
    TokenLogprobs,
    linear_cross_entropy,
    sequence_logprobs,
    token_logprobs,
)
from backends_under_test import BACKENDS, backend_device
from tiny_models import tiny_llama

IGNORE = -100


def released_get_batch_logps(logits, labels, average_log_prob=False):
    """The released AutoRegEmbed / DPO `_get_batch_logps`, transcribed: full logits, shifted labels."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != IGNORE
    labels[labels == IGNORE] = 0
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def random_labels(batch, length, vocab, pattern):
    labels = torch.randint(0, vocab, (batch, length))
    if pattern == "memory-prefix":  # k memory slots unscored, as in the decoder input
        labels[:, :5] = IGNORE
    elif pattern == "right-padding":
        for row, keep in enumerate(torch.randint(2, length, (batch,)).tolist()):
            labels[row, keep:] = IGNORE
    elif pattern == "random":
        labels[torch.rand(batch, length) < 0.4] = IGNORE
        labels[:, 1] = 0  # every row keeps a scored token (position 1 is the first shifted label)
    return labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["none", "memory-prefix", "right-padding", "random"])
@pytest.mark.parametrize("average", [False, True], ids=["sum", "average"])
def test_sequence_logprobs_equals_released_get_batch_logps(backend, pattern, average):
    device = backend_device(backend)
    hidden = torch.randn(4, 13, 24, dtype=torch.float64).float()
    weight = torch.randn(131, 24) * 0.4
    bias = torch.randn(131)
    labels = random_labels(4, 13, 131, pattern)
    expected = released_get_batch_logps(
        (hidden.double() @ weight.double().t() + bias.double()), labels, average)
    actual = sequence_logprobs(hidden.to(device), weight.to(device), labels.to(device),
                               bias=bias.to(device), average=average, backend=backend)
    assert actual.shape == (4,)
    assert torch.allclose(actual.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_without_shift():
    hidden, weight = torch.randn(2, 6, 8), torch.randn(11, 8)
    labels = random_labels(2, 6, 11, "random")
    expected = torch.log_softmax(hidden.double() @ weight.double().t(), -1).gather(
        2, labels.clamp(min=0)[..., None])[..., 0]
    expected = (expected * (labels != IGNORE)).sum(-1)
    assert torch.allclose(sequence_logprobs(hidden, weight, labels, shift=False).double(), expected,
                          atol=1e-5)


def test_sequence_logprobs_average_of_empty_row_raises():
    labels = torch.full((2, 5), IGNORE)
    labels[0, 3] = 1
    with pytest.raises(ValueError, match="row 1 has no scored token"):
        sequence_logprobs(torch.randn(2, 5, 4), torch.randn(7, 4), labels, average=True)


def test_sequence_logprobs_gradient_flows_to_hidden():
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    weight = torch.randn(19, 8)
    labels = random_labels(3, 7, 19, "right-padding")
    sequence_logprobs(hidden, weight, labels).sum().backward()
    reference = hidden.detach().double().requires_grad_()
    released_get_batch_logps(reference @ weight.double().t(), labels).sum().backward()
    assert torch.allclose(hidden.grad.double(), reference.grad, atol=1e-5)


@pytest.mark.parametrize("head", ["tied", "untied-with-bias"])
@pytest.mark.parametrize("pattern", ["none", "memory-prefix", "right-padding"])
def test_linear_cross_entropy_equals_hf_loss(head, pattern):
    model = tiny_llama(tied=head == "tied", head_bias=head != "tied")
    input_ids = torch.randint(0, 97, (3, 17))
    labels = random_labels(3, 17, 97, pattern)
    expected = model(input_ids=input_ids, labels=labels).loss
    hidden = model.model(input_ids=input_ids).last_hidden_state
    head_module = model.get_output_embeddings()
    actual = linear_cross_entropy(hidden, head_module.weight, labels, bias=head_module.bias)
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    module_loss = LinearCrossEntropyLoss()(hidden, head_module.weight, labels, bias=head_module.bias)
    assert torch.equal(module_loss, actual)


def test_linear_cross_entropy_reductions():
    hidden, weight = torch.randn(2, 9, 8), torch.randn(23, 8)
    labels = random_labels(2, 9, 23, "random")
    logits = (hidden.double() @ weight.double().t())[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, 23), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE, reduction="none").reshape(2, 8)
    none = linear_cross_entropy(hidden, weight, labels, reduction="none")
    assert none.shape == (2, 8)
    assert torch.allclose(none.double(), per_token, atol=1e-5)
    assert torch.allclose(linear_cross_entropy(hidden, weight, labels, reduction="sum").double(),
                          per_token.sum(), atol=1e-4)
    all_ignored = torch.full_like(labels, IGNORE)
    assert linear_cross_entropy(hidden, weight, all_ignored).item() == 0.0


def test_linear_cross_entropy_bad_input():
    hidden, weight = torch.randn(2, 9, 8), torch.randn(23, 8)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, torch.zeros(2, 9, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="same leading shape"):
        linear_cross_entropy(hidden, weight, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence axis"):
        linear_cross_entropy(torch.randn(8), weight, torch.zeros((), dtype=torch.long))


@pytest.mark.parametrize("lead_shape", [(13,), (2, 9), (2, 3, 5)], ids=["N", "BxT", "AxBxT"])
@pytest.mark.parametrize("shift", [False, True], ids=["no-shift", "shift"])
def test_linear_cross_entropy_any_leading_shape(lead_shape, shift):
    """hidden [..., d] with labels [...], as Cut Cross-Entropy takes them; shift runs along the last
    label axis. Checked against torch's cross-entropy on the explicit logits, and the module form."""
    hidden, weight, bias = torch.randn(*lead_shape, 8), torch.randn(23, 8), torch.randn(23)
    labels = torch.randint(0, 23, lead_shape)
    labels.view(-1)[::4] = IGNORE
    logits = hidden.double() @ weight.double().t() + bias.double()
    scored = labels
    if shift:
        logits, scored = logits[..., :-1, :], labels[..., 1:]
    expected = F.cross_entropy(logits.reshape(-1, 23), scored.reshape(-1), ignore_index=IGNORE)
    got = LinearCrossEntropyLoss(shift=shift)(hidden, weight, labels, bias=bias)
    assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, expected.item())
    per_token = linear_cross_entropy(hidden, weight, labels, bias=bias, shift=shift, reduction="none")
    assert per_token.shape == scored.shape


def test_token_logprobs_module_equals_the_function():
    hidden, weight, targets = torch.randn(3, 7, 8), torch.randn(23, 8), torch.randint(0, 23, (3, 7))
    module = TokenLogprobs(softcap=4.0, backend="cpu")
    assert torch.equal(module(hidden, weight, targets),
                       token_logprobs(hidden, weight, targets, softcap=4.0, backend="cpu"))
