"""torch.compile (inductor, CPU) over the public functions: one graph (fullgraph), no recompilation when
the number of tokens changes, values and gradients equal to eager; bad values still raise."""

import pytest
import torch
import torch._dynamo.testing

from autoregembed_fast import AlignmentLoss, linear_cross_entropy, sequence_logprobs, token_logprobs
from oracle import oracle_grads, token_logprobs_oracle

V, D = 101, 16


def compiled(function):
    """(compiled function, frame counter): the counter sees each graph dynamo hands to inductor."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    return torch.compile(function, fullgraph=True, dynamic=True, backend=counter), counter


def leaf(tensor, requires_grad=True):
    return tensor.detach().clone().requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def frozen_head_scores(hidden, weight, targets, grad_out):
    return (token_logprobs(hidden, weight, targets) * grad_out).sum()


def test_token_logprobs_compiles_once_for_every_n():
    run, counter = compiled(frozen_head_scores)
    weight = torch.randn(V, D) / 4
    for n in (37, 53, 8):
        hidden, targets = torch.randn(n, D), torch.randint(0, V, (n,))
        targets[::3] = -100
        grad_out = torch.randn(n)
        results = []
        for function in (run, frozen_head_scores):
            hidden_leaf = leaf(hidden)
            value = function(hidden_leaf, weight, targets, grad_out)
            value.backward()
            results.append((value.detach(), hidden_leaf.grad))
        (compiled_value, compiled_grad), (eager_value, eager_grad) = results
        # Inductor fuses the product and the sum: equal up to the order of the reduction.
        assert torch.allclose(compiled_value, eager_value, rtol=1e-6, atol=0)
        assert torch.allclose(compiled_grad, eager_grad, rtol=1e-6, atol=1e-8)
        truth = (token_logprobs_oracle(hidden, weight, targets) * grad_out.double()).sum()
        assert abs(compiled_value.item() - truth.item()) <= 1e-5 * max(1.0, abs(truth.item()))
        truth_grad = oracle_grads(hidden, weight, targets, grad_out)[0]
        assert (compiled_grad.double() - truth_grad).abs().max() <= 1e-4 * truth_grad.abs().max()
    assert counter.frame_count == 1


def test_linear_cross_entropy_trainable_head_compiles_once_for_every_length():
    run, counter = compiled(lambda h, w, b, y: linear_cross_entropy(h, w, y, bias=b, softcap=5.0))
    weight, bias = torch.randn(V, D) / 4, torch.randn(V)
    for length in (9, 13, 30):
        hidden, labels = torch.randn(2, length, D), torch.randint(0, V, (2, length))
        labels[0, length // 2 :] = -100
        results = []
        for function in (run, lambda h, w, b, y: linear_cross_entropy(h, w, y, bias=b, softcap=5.0)):
            leaves = [leaf(hidden), leaf(weight), leaf(bias)]
            loss = function(*leaves, labels)
            loss.backward()
            results.append((loss.detach(), [t.grad for t in leaves]))
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = results
        assert torch.allclose(compiled_loss, eager_loss, rtol=1e-6, atol=0)
        for actual, expected in zip(compiled_grads, eager_grads):
            assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-7)
    assert counter.frame_count == 1


def test_averaged_sequence_logprobs_compile_once_for_every_length():
    weight = torch.randn(V, D) / 4

    def averaged(hidden, labels):
        return sequence_logprobs(hidden, weight, labels, average=True)

    run, counter = compiled(averaged)
    for length in (9, 14):
        hidden, labels = torch.randn(3, length, D), torch.randint(0, V, (3, length))
        labels[1, : length // 2] = -100
        results = []
        for function in (run, averaged):
            hidden_leaf = leaf(hidden)
            scores = function(hidden_leaf, labels)
            scores.sum().backward()
            results.append((scores.detach(), hidden_leaf.grad))
        assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=0)
        assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)
    assert counter.frame_count == 1


def test_alignment_loss_compiles_once_for_every_batch():
    loss_module = AlignmentLoss(beta=0.5, temperature=0.1)
    run, counter = compiled(loss_module)
    for batch, negatives in ((4, 3), (7, 3), (5, 2)):
        scores = [torch.randn(batch), torch.randn(batch), torch.randn(batch, negatives),
                  torch.randn(batch), torch.randn(batch, negatives)]
        results = []
        for function in (run, loss_module):
            leaves = [leaf(s) for s in scores[:3]]
            loss = function(*leaves, *scores[3:])
            loss.backward()
            results.append((loss.detach(), [t.grad for t in leaves]))
        assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=0)
        for actual, expected in zip(results[0][1], results[1][1]):
            assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-8)
    assert counter.frame_count == 1


def test_bad_values_still_raise_when_compiled():
    """The target-range and finiteness checks live inside the op: compiled code raises them too."""
    run, _ = compiled(lambda h, w, t: token_logprobs(h, w, t))
    hidden, weight = torch.randn(6, D), torch.randn(V, D)
    with pytest.raises(ValueError, match=f"outside \\[0, V\\) = \\[0, {V}\\)"):
        run(hidden, weight, torch.tensor([0, 1, V, 2, 3, 4]))
    hidden[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        run(hidden, weight, torch.tensor([0, 1, 2, 3, 4, 5]))
