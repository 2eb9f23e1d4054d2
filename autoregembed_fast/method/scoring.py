"""Scoring target texts under the frozen decoder given memory embeddings: the decoder reads
`[memory ; embedded target]` and the op scores each target token under its LM head."""

from __future__ import annotations

import torch

from autoregembed_fast.huggingface import lm_head_of
from autoregembed_fast.ops import token_logprobs
from autoregembed_fast.method.packing import (
    check_packing_support,
    pack_sequences,
    packing_of,
    unpack_sequences,
)


def check_right_padded(mask: torch.Tensor, name: str) -> None:
    real = mask.bool()
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        row = int((real[:, 1:] & ~real[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} must be right-padded (each row's 1s, then 0s); row {row} is not")


def _check_score_inputs(decoder, memory, target_ids, target_mask, memory_index):
    if memory.dim() != 3:
        raise ValueError(f"memory must have shape [M, k, d], got {tuple(memory.shape)}")
    hidden_size = decoder.get_input_embeddings().weight.shape[1]
    if memory.shape[2] != hidden_size:
        raise ValueError(f"memory's last dim {memory.shape[2]} does not match the decoder's hidden "
                         f"size {hidden_size}")
    if target_ids.dim() != 2:
        raise ValueError(f"target_ids must have shape [S, T], got {tuple(target_ids.shape)}")
    if tuple(target_mask.shape) != tuple(target_ids.shape):
        raise ValueError(f"target_mask must have the shape of target_ids {tuple(target_ids.shape)}, "
                         f"got {tuple(target_mask.shape)}")
    if memory_index.dim() != 1 or memory_index.shape[0] != target_ids.shape[0]:
        raise ValueError(f"memory_index must have shape [S] = ({target_ids.shape[0]},), got "
                         f"{tuple(memory_index.shape)}")
    if target_ids.shape[0] == 0 or target_ids.shape[1] == 0:
        raise ValueError(f"no targets to score: target_ids has shape {tuple(target_ids.shape)}")
    if memory_index.dtype.is_floating_point or memory_index.dtype == torch.bool:
        raise TypeError(f"memory_index must be an integer tensor, got {memory_index.dtype}")
    if bool(((memory_index < 0) | (memory_index >= memory.shape[0])).any()):
        raise ValueError(f"memory_index holds values outside [0, M) = [0, {memory.shape[0]}): "
                         f"{memory_index.tolist()}")
    check_right_padded(target_mask, "target_mask")
    lengths = target_mask.bool().sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError(f"target {(lengths == 0).nonzero()[0].item()} is empty (its mask is all 0)")
    vocab_size = decoder.get_input_embeddings().weight.shape[0]
    real = target_ids[target_mask.bool()]
    if bool(((real < 0) | (real >= vocab_size)).any()):
        raise ValueError(f"target_ids holds token ids outside [0, {vocab_size})")
    context = getattr(decoder.config, "max_position_embeddings", None)
    length = memory.shape[1] + target_ids.shape[1]
    if context is not None and length > context:
        raise ValueError(f"k + T = {memory.shape[1]} + {target_ids.shape[1]} = {length} exceeds the "
                         f"decoder's context of {context} positions")


def decoder_scoring_inputs(decoder, memory, target_ids, target_mask, memory_index, packed=True):
    """Runs the decoder's base model once over ``[memory[memory_index[s]] ; embed(target_s)]`` for all
    targets and returns what scores them: (hidden [S, T, d], labels [S, T] with -100 on padding,
    head weight, head bias, softcap), hidden position t predicting target token t. See
    `score_targets` for the arguments."""
    _check_score_inputs(decoder, memory, target_ids, target_mask, memory_index)
    weight, bias, softcap = lm_head_of(decoder)
    real = target_mask.bool()
    n_memory, width = memory.shape[1], target_ids.shape[1]

    # Padded positions may hold any id (even -100): embed a valid one there, it is masked out anyway.
    embeddings = decoder.get_input_embeddings()(torch.where(real, target_ids, 0))
    inputs = torch.cat([memory.index_select(0, memory_index).to(embeddings.dtype), embeddings], dim=1)
    if packed:
        check_packing_support(decoder.base_model)
        packing = packing_of(n_memory + real.sum(dim=1).cpu(), real.device)
        hidden = decoder.base_model(inputs_embeds=pack_sequences(inputs, packing),
                                    position_ids=packing.position_ids, use_cache=False
                                    ).last_hidden_state
        hidden = unpack_sequences(hidden, packing, n_memory + width)
    else:
        attention_mask = torch.cat(
            [torch.ones(real.shape[0], n_memory, dtype=torch.long, device=real.device), real.long()],
            dim=1)
        hidden = decoder.base_model(inputs_embeds=inputs, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state
    # Position k - 1 + t (the last memory slot, then each target token) predicts target token t.
    # Under autocast the hidden states come out in the autocast dtype while the head stays fp32: the
    # op computes in the autocast dtype as `lm_head` would (no [S, T, d] upcast here).
    scoring_hidden = hidden[:, n_memory - 1 : n_memory - 1 + width]
    return scoring_hidden, torch.where(real, target_ids, -100), weight, bias, softcap


def memory_for_decoder(decoder, memory: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """The prefix the frozen decoder reads before a target: the memory [B, k, d] itself (the released
    layout), or with `bos_id` the decoder's embedding of that token first, [B, 1 + k, d], so that
    no memory vector sits at position 0 (where a causal LM's attention sink is)."""
    if bos_id is None:
        return memory
    bos = decoder.get_input_embeddings().weight[bos_id].to(memory.dtype)
    return torch.cat([bos.expand(memory.shape[0], 1, memory.shape[2]), memory], dim=1)


def score_targets(
    decoder,
    memory: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    memory_index: torch.Tensor,
    *,
    backend: str = "auto",
    packed: bool = True,
) -> torch.Tensor:
    """log p(target_s | memory[memory_index[s]]) under the frozen decoder, for every target: ``[S]``.

    Args:
        decoder: a Hugging Face causal LM (``...ForCausalLM``); its weights are not updated here.
        memory: ``[M, k, d]`` memory embeddings of M texts. A query's memory is computed once and
            indexed by its positive and all its negatives (gradients accumulate into it).
        target_ids: ``[S, T]`` token ids, right-padded; target_mask ``[S, T]``: 1 on real tokens.
        memory_index: ``[S]`` int, the memory row each target is conditioned on.
        packed: run the decoder padding-free, the sequences packed into a few rows
            (`autoregembed_fast.method.packing`); False: one right-padded batch.

    Runs the decoder's base model once over ``[memory[memory_index[s]] ; embed(target_s)]`` for all
    targets (memory slots and padding unscored), takes its last hidden states and scores the target
    tokens with the fused op: the LM head never sees a full sequence and no logits are materialised.
    Differentiable w.r.t. ``memory`` (and anything upstream of it).
    """
    hidden, labels, weight, bias, softcap = decoder_scoring_inputs(
        decoder, memory, target_ids, target_mask, memory_index, packed)
    logp = token_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, backend=backend)
    return logp.sum(dim=1)
