"""score_targets against the decoder's own logits, one target at a time (no padding, no sharing)."""

import pytest
import torch

from autoregembed_fast import score_targets, token_logprobs
from autoregembed_fast.method.packing import check_packing_support
from tiny_models import tiny_gemma2, tiny_llama

DECODERS = {
    "llama-tied": lambda: tiny_llama(),
    "llama-untied-bias": lambda: tiny_llama(tied=False, head_bias=True),
    "gemma2-softcap": lambda: tiny_gemma2(),
}


def make_batch(decoder, n_memory=3, k=4, lengths=(5, 9, 3, 7, 9, 1)):
    """Memory rows and right-padded targets; targets 0-2 share memory row 0, 3-4 row 2, 5 row 1."""
    vocab, hidden = decoder.get_input_embeddings().weight.shape
    memory = torch.randn(n_memory, k, hidden) * 0.5
    longest = max(lengths)
    target_ids = torch.full((len(lengths), longest), -100)  # padding ids the scorer must not embed
    target_mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        target_ids[row, :length] = torch.randint(0, vocab, (length,))
        target_mask[row, :length] = 1
    memory_index = torch.tensor([0, 0, 0, 2, 2, 1])
    return memory, target_ids, target_mask, memory_index


def eager_scores(decoder, memory, target_ids, target_mask, memory_index):
    """Each target alone through the full causal LM (its own logits), summed log-probs."""
    scores = []
    for row in range(target_ids.shape[0]):
        tokens = target_ids[row, target_mask[row].bool()]
        inputs = torch.cat([memory[memory_index[row]], decoder.get_input_embeddings()(tokens)])
        logits = decoder(inputs_embeds=inputs[None]).logits[0].double()
        k = memory.shape[1]
        logp = torch.log_softmax(logits[k - 1 : k - 1 + len(tokens)], dim=-1)
        scores.append(logp.gather(1, tokens[:, None]).sum())
    return torch.stack(scores)


# Similar lengths, and a spread of lengths (packed: several short targets share a row).
LENGTHS = {"similar": (5, 9, 3, 7, 9, 1), "spread": (2, 57, 3, 1, 55, 2)}


# Packed into one row (the default row budget), into rows of at most 16 tokens (several rows with
# unused tails), or one right-padded batch: (packed, row budget).
LAYOUTS = {"packed": (True, None), "packed-rows-of-16": (True, 16), "padded": (False, None)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("lengths", sorted(LENGTHS))
@pytest.mark.parametrize("decoder_name", sorted(DECODERS))
def test_score_targets_matches_eager_logits_and_gradients(monkeypatch, decoder_name, lengths, layout):
    packed, row_tokens = LAYOUTS[layout]
    if row_tokens is not None:
        monkeypatch.setattr("autoregembed_fast.method.packing.PACKED_ROW_TOKENS", row_tokens)
    decoder = DECODERS[decoder_name]()
    memory, target_ids, target_mask, memory_index = make_batch(decoder, lengths=LENGTHS[lengths])
    grad_out = torch.randn(target_ids.shape[0])

    memory_fused = memory.clone().requires_grad_()
    fused = score_targets(decoder, memory_fused, target_ids, target_mask, memory_index, packed=packed)
    (fused * grad_out).sum().backward()

    memory_eager = memory.clone().requires_grad_()
    eager = eager_scores(decoder, memory_eager, target_ids, target_mask, memory_index)
    (eager * grad_out.double()).sum().backward()

    assert fused.shape == (6,)
    assert torch.allclose(fused.double(), eager, rtol=1e-5, atol=1e-4)
    assert torch.allclose(memory_fused.grad, memory_eager.grad, rtol=1e-4, atol=1e-5)
    assert memory_fused.grad[0].abs().sum() > 0  # the shared row receives its targets' gradients


@pytest.mark.parametrize("lengths", sorted(LENGTHS))
def test_score_targets_runs_the_decoder_once_packed_and_never_its_head(monkeypatch, lengths):
    decoder = tiny_llama()
    memory, target_ids, target_mask, memory_index = make_batch(decoder, lengths=LENGTHS[lengths])
    check_packing_support(decoder.model)  # its probe runs the base model once per model, first
    calls = {"base": [], "head": 0}
    base_forward = decoder.model.forward

    def recording_base(*args, **kwargs):
        calls["base"].append(kwargs)
        return base_forward(*args, **kwargs)

    monkeypatch.setattr(decoder.model, "forward", recording_base)
    decoder.lm_head.register_forward_hook(lambda *args: calls.__setitem__("head", calls["head"] + 1))
    score_targets(decoder, memory, target_ids, target_mask, memory_index)
    assert len(calls["base"]) == 1 and calls["head"] == 0
    (kwargs,) = calls["base"]
    assert kwargs.get("attention_mask") is None and kwargs["use_cache"] is False
    # Every memory slot and target token once, in one row (fewer tokens than the row budget): no
    # padding at all.
    real_tokens = int(target_mask.sum()) + memory.shape[1] * target_ids.shape[0]
    assert kwargs["inputs_embeds"].shape[:2] == kwargs["position_ids"].shape == (1, real_tokens)


def bad_cases(decoder):
    memory, target_ids, target_mask, memory_index = make_batch(decoder)
    empty_mask = target_mask.clone()
    empty_mask[2] = 0
    long_ids = torch.zeros(6, 61, dtype=torch.long)  # k = 4 + 61 > 64 positions
    return {
        "memory-2d": (dict(memory=memory[0]), ValueError, "memory"),
        "memory-width": (dict(memory=memory[..., :5]), ValueError, "hidden size"),
        "mask-shape": (dict(target_mask=target_mask[:, :3]), ValueError, "target_mask"),
        "index-length": (dict(memory_index=memory_index[:4]), ValueError, "memory_index"),
        "index-out-of-range": (dict(memory_index=torch.tensor([0, 0, 0, 2, 3, 1])), ValueError,
                               "outside"),
        "index-float": (dict(memory_index=memory_index.float()), TypeError, "memory_index"),
        "empty-target": (dict(target_mask=empty_mask), ValueError, "target 2 is empty"),
        "no-targets": (dict(target_ids=target_ids[:0], target_mask=target_mask[:0],
                            memory_index=memory_index[:0]), ValueError, "no targets"),
        "token-out-of-vocab": (dict(target_ids=torch.where(target_mask.bool(), 500, 0)), ValueError,
                               "token ids"),
        "left-padded": (dict(target_mask=target_mask.flip(1)), ValueError, "right-padded"),
        "too-long": (dict(target_ids=long_ids, target_mask=torch.ones_like(long_ids)), ValueError,
                     "context"),
    }, dict(memory=memory, target_ids=target_ids, target_mask=target_mask,
            memory_index=memory_index)


@pytest.mark.parametrize("case", sorted(bad_cases(tiny_llama())[0]))
def test_score_targets_bad_input(case):
    decoder = tiny_llama()
    cases, good = bad_cases(decoder)
    overrides, error, message = cases[case]
    with pytest.raises(error, match=message):
        score_targets(decoder, **{**good, **overrides})


def test_checkpointed_decoder_scores_and_gradients_are_unchanged():
    from autoregembed_fast.method.loading import frozen_decoder

    plain = tiny_llama()
    checkpointed = frozen_decoder(tiny_llama(), gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    memory, target_ids, target_mask, memory_index = make_batch(plain)
    results = []
    for decoder in (plain, checkpointed):
        leaf = memory.clone().requires_grad_()
        scores = score_targets(decoder, leaf, target_ids, target_mask, memory_index)
        scores.sum().backward()
        results.append((scores, leaf.grad))
    assert checkpointed.training and checkpointed.model.gradient_checkpointing
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


@pytest.mark.parametrize("decoder_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_score_targets_under_autocast_scores_the_hidden_states_as_they_come(monkeypatch, decoder_dtype):
    """Under bf16 autocast the op gets the decoder's hidden states in the dtype they come out in (HF
    keeps the residual stream of an fp32 model in fp32; a bf16 model's is bf16): no [S, T, d] cast
    here, and the op computes as the autocast `lm_head` would (bf16 operands, fp32 softmax)."""
    import autoregembed_fast.method.scoring as scoring_module

    seen = []

    def recording(hidden, weight, targets, **kwargs):
        seen.append(hidden.dtype)
        return token_logprobs(hidden, weight, targets, **kwargs)

    monkeypatch.setattr(scoring_module, "token_logprobs", recording)
    decoder = tiny_llama().to(decoder_dtype)
    memory, target_ids, target_mask, memory_index = make_batch(decoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = score_targets(decoder, memory, target_ids, target_mask, memory_index)
        eager = eager_scores(decoder, memory, target_ids, target_mask, memory_index)
    assert seen == [decoder_dtype]
    assert fused.dtype == torch.float32
    # Both round the head to bf16; eager also rounds its logits to bf16.
    assert torch.allclose(fused.double(), eager, rtol=2e-2, atol=0.1)
