"""The Hugging Face integration: `lm_head_of` (a causal LM's output head as the op takes it) and
`patch_model` (a causal LM computes its training loss with the fused linear cross-entropy, so the LM
head never runs over the full sequence and no logits are materialised)."""

from __future__ import annotations

import types

import torch
from torch.nn import functional as F

from autoregembed_fast.losses import linear_cross_entropy

# The families whose `...ForCausalLM.forward` is "base model -> lm_head (-> final softcap) -> causal LM
# loss" and nothing else, checked against transformers' sources. SmolLM models are LlamaForCausalLM.
SUPPORTED_MODELS = (
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
IGNORE_INDEX = -100


def lm_head_of(decoder):
    """(weight [V, d], bias [V] or None, softcap or None) of a Hugging Face causal LM's output head:
    tied or not, with its bias if it has one and the config's final_logit_softcapping if set."""
    head = decoder.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(decoder).__name__} has no linear output head (get_output_embeddings)")
    softcap = getattr(decoder.config, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), softcap


def patch_model(model, *, backend: str = "auto"):
    """Makes a Hugging Face causal LM compute its loss with `linear_cross_entropy` whenever `labels`
    are given; returns the model (patched in place, this instance only).

    With labels, `forward` runs the base model, then the fused loss on its last hidden states and the
    head's weight (tied or not), bias and the config's `final_logit_softcapping`; `outputs.logits` is
    None. Hugging Face's conventions are kept: labels are shifted inside (`labels[..., 1:]` scored by
    positions `:-1`; pre-shifted `shift_labels`, passed with `labels`, are taken as they are), `-100` is ignored, and with
    `num_items_in_batch` (the Trainer's gradient-accumulation normaliser) the loss is the sum over
    scored tokens divided by it, otherwise their mean. One difference: a batch with no scored token
    gives 0 where Hugging Face gives NaN. Without labels the model's own forward runs unchanged
    (generation too). Under autocast the loss computes as the autocast head would.

    Raises TypeError for a model outside `SUPPORTED_MODELS`.
    """
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise TypeError(f"patch_model supports {', '.join(SUPPORTED_MODELS)}; got {name}")
    model.forward = types.MethodType(_fused_loss_forward, model)
    model._autoregembed_backend = backend
    return model


def _fused_loss_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                        past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                        logits_to_keep=0, **kwargs):
    if labels is None:
        # The class's forward, not a saved bound method: a deep copy of the model stays consistent.
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("logits_to_keep selects positions for logits; with labels every position is "
                         "scored, so leave it at 0")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        # Hugging Face's shift: position t scores labels[t + 1], the last position scores nothing.
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    weight, bias, softcap = lm_head_of(self)
    loss = linear_cross_entropy(
        hidden, weight, shift_labels.to(hidden.device), bias=bias, shift=False,
        reduction="mean" if num_items_in_batch is None else "sum", ignore_index=IGNORE_INDEX,
        softcap=softcap, backend=self._autoregembed_backend,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    output = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return output.to_tuple() if return_dict is False else output
