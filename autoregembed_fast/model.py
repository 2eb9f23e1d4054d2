"""Models of AutoRegEmbed: scoring target texts under a frozen Hugging Face decoder given memory
embeddings."""

from __future__ import annotations

import torch

from autoregembed_fast.ops import token_logprobs


def lm_head_of(decoder):
    """(weight [V, d], bias [V] or None, softcap or None) of a Hugging Face causal LM's output head:
    tied or not, with its bias if it has one and the config's final_logit_softcapping if set."""
    head = decoder.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(decoder).__name__} has no linear output head (get_output_embeddings)")
    softcap = getattr(decoder.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


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


def score_targets(
    decoder,
    memory: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
    memory_index: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """log p(target_s | memory[memory_index[s]]) under the frozen decoder, for every target: ``[S]``.

    Args:
        decoder: a Hugging Face causal LM (``...ForCausalLM``); its weights are not updated here.
        memory: ``[M, k, d]`` memory embeddings of M texts. A query's memory is computed once and
            indexed by its positive and all its negatives (gradients accumulate into it).
        target_ids: ``[S, T]`` token ids, right-padded; target_mask ``[S, T]``: 1 on real tokens.
        memory_index: ``[S]`` int, the memory row each target is conditioned on.

    Runs the decoder's base model once over ``[memory[memory_index[s]] ; embed(target_s)]`` for all
    targets (memory slots and padding unscored), takes its last hidden states and scores the target
    tokens with the fused op: the LM head never sees a full sequence and no logits are materialised.
    Differentiable w.r.t. ``memory`` (and anything upstream of it).
    """
    _check_score_inputs(decoder, memory, target_ids, target_mask, memory_index)
    weight, bias, softcap = lm_head_of(decoder)
    real = target_mask.bool()
    n_memory = memory.shape[1]

    # Padded positions may hold any id (even -100): embed a valid one there, it is masked out anyway.
    embeddings = decoder.get_input_embeddings()(torch.where(real, target_ids, 0))
    inputs = torch.cat([memory.index_select(0, memory_index).to(embeddings.dtype), embeddings], dim=1)
    attention_mask = torch.cat(
        [torch.ones(real.shape[0], n_memory, dtype=torch.long, device=real.device), real.long()], dim=1
    )
    hidden = decoder.base_model(inputs_embeds=inputs, attention_mask=attention_mask).last_hidden_state

    # Position k - 1 + t (the last memory slot, then each target token) predicts target token t.
    scoring_hidden = hidden[:, n_memory - 1 : n_memory - 1 + target_ids.shape[1]]
    labels = torch.where(real, target_ids, -100)
    logp = token_logprobs(scoring_hidden, weight, labels, bias=bias, softcap=softcap, backend=backend)
    return logp.sum(dim=1)
