"""autoregembed_fast: fused kernels and a lean training loop for AutoRegEmbed.

Public API:

- `token_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, softcap=None,
  backend="auto")`: per-token log-likelihood under a linear LM head without materialising the N x V
  logits; differentiable, with a frozen-head fast path (see `autoregembed_fast.ops`).
"""

import torch  # noqa: F401  (the C++ extension needs torch's libraries loaded first)

from autoregembed_fast.ops import BACKENDS, token_logprobs

__all__ = ["BACKENDS", "token_logprobs"]
__version__ = "0.1.0"
