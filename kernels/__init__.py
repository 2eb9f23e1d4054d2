"""Triton kernels of autoregembed_fast, installed as the subpackage `autoregembed_fast.kernels`.

One kernel family per module: `lse_forward` (fused log-sum-exp + target logit), `logits_backward`
(recompute backward / fused Jacobian), `logits_epilogue` (epilogue of the chunked route); device
helpers in `tl_utils`. Importing this package does not import triton.

Every launcher takes its tensor arguments as any strided views (transposed, sliced, offset): the
strides go to the kernels, nothing is copied. Launches happen under the device of the inputs.
"""

import contextlib
import os

import torch

# Under TRITON_INTERPRET=1 (CPU tests) the kernels run on CPU tensors through the interpreter, where
# tl.dot on bf16/fp16 operands returns garbage (upstream bug): the kernels upcast tiles to fp32 there,
# and keep low-precision tensor-core dots on a GPU.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def on_device(tensor: torch.Tensor):
    """The context to launch a kernel for `tensor` in: Triton launches on the *current* CUDA device,
    so inputs on cuda:1 (device_map="auto") need cuda:1 made current; CPU tensors (interpreter) need
    nothing."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def token_bucket(n_tokens: int) -> int:
    """The autotuning key's bucket of N: the next power of two (capped at 2^16), so a new N re-tunes
    only when it changes the tile balance, not on every call."""
    return min(1 << max(n_tokens - 1, 0).bit_length(), 1 << 16)


def operand_kind(dtype: torch.dtype) -> str:
    """Which autotune config set a kernel uses: "fp32" (exact fp32 dots) or "16-bit" (tensor cores)."""
    return "fp32" if dtype == torch.float32 else "16-bit"
