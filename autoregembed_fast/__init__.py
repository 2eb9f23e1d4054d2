"""autoregembed_fast: fused kernels and a lean training loop for AutoRegEmbed.

Two layers. The op package, for anyone training a causal LM (importing it imports nothing else):

- `token_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
  backend="auto")`: per-token log-likelihood under a linear LM head without materialising the N x V
  logits; differentiable, with a frozen-head fast path (`autoregembed_fast.ops`).
- `TokenLogprobs`, `sequence_logprobs`, `linear_cross_entropy` / `LinearCrossEntropyLoss`: generic
  losses on it (`autoregembed_fast.losses`).
- `patch_model(model)`: a Hugging Face causal LM (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3, SmolLM)
  computes its loss with the fused linear cross-entropy whenever labels are given; `lm_head_of`
  (`autoregembed_fast.huggingface`).

The AutoRegEmbed method on top of it (`autoregembed_fast.method`), whose public names are importable
from here too and load the method on first use:

- `score_targets(decoder, memory, target_ids, target_mask, memory_index)`: log p(target | memory)
  under a frozen Hugging Face decoder, one decoder pass for all targets, memory shared by index.
- `CompressionLoss` (stage 1, = `LinearCrossEntropyLoss`), `alignment_loss` / `AlignmentLoss`
  (stage 2, the released code's formula).
"""

import importlib

import torch  # noqa: F401  (the C++ extension needs torch's libraries loaded first)

from autoregembed_fast.huggingface import lm_head_of, patch_model
from autoregembed_fast.losses import (
    LinearCrossEntropyLoss,
    TokenLogprobs,
    linear_cross_entropy,
    sequence_logprobs,
)
from autoregembed_fast.ops import BACKENDS, token_logprobs

# The method's public names, imported on first access so that the op package stays apart from it.
METHOD_NAMES = {
    "score_targets": "autoregembed_fast.method.scoring",
    "AlignmentLoss": "autoregembed_fast.method.losses",
    "CompressionLoss": "autoregembed_fast.method.losses",
    "alignment_loss": "autoregembed_fast.method.losses",
}


def __getattr__(name):
    if name in METHOD_NAMES:
        return getattr(importlib.import_module(METHOD_NAMES[name]), name)
    raise AttributeError(f"module 'autoregembed_fast' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "AlignmentLoss",
    "CompressionLoss",
    "LinearCrossEntropyLoss",
    "TokenLogprobs",
    "alignment_loss",
    "linear_cross_entropy",
    "lm_head_of",
    "patch_model",
    "score_targets",
    "sequence_logprobs",
    "token_logprobs",
]
__version__ = "0.1.0"
