"""autoregembed_fast: fused kernels and a lean training loop for AutoRegEmbed.

Public API:

- `token_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
  backend="auto")`: per-token log-likelihood under a linear LM head without materialising the N x V
  logits; differentiable, with a frozen-head fast path (`autoregembed_fast.ops`).
- `TokenLogprobs`: the op as a module.
- `sequence_logprobs`, `linear_cross_entropy` / `LinearCrossEntropyLoss` (= `CompressionLoss`, the
  stage-1 loss), `alignment_loss` / `AlignmentLoss`: the method's losses on top of it
  (`autoregembed_fast.losses`).
- `score_targets(decoder, memory, target_ids, target_mask, memory_index)`: log p(target | memory) under
  a frozen Hugging Face decoder, one decoder pass for all targets, memory shared by index
  (`autoregembed_fast.model`).
- `patch_model(model)`: a Hugging Face causal LM (Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3, SmolLM)
  computes its loss with the fused linear cross-entropy whenever labels are given
  (`autoregembed_fast.patch`).
"""

import torch  # noqa: F401  (the C++ extension needs torch's libraries loaded first)

from autoregembed_fast.losses import (
    AlignmentLoss,
    CompressionLoss,
    LinearCrossEntropyLoss,
    TokenLogprobs,
    alignment_loss,
    linear_cross_entropy,
    sequence_logprobs,
)
from autoregembed_fast.model import score_targets
from autoregembed_fast.patch import patch_model
from autoregembed_fast.ops import BACKENDS, token_logprobs

__all__ = [
    "BACKENDS",
    "AlignmentLoss",
    "CompressionLoss",
    "LinearCrossEntropyLoss",
    "TokenLogprobs",
    "alignment_loss",
    "linear_cross_entropy",
    "patch_model",
    "score_targets",
    "sequence_logprobs",
    "token_logprobs",
]
__version__ = "0.1.0"
