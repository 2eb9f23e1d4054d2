"""Per-token log-likelihood under a linear LM head, without materialising the N x V logits.

`token_logprobs` is the one public op; everything else here is its validation, backend dispatch and
autograd. A backend provides two calls on compacted inputs (ignored tokens already removed):

- ``forward(hidden [N, d], weight [V, d], bias [V] | None, targets [N], softcap, with_jacobian)``
  -> ``(logp [N], lse [N], jacobian [N, d] | None)``, in the accumulation dtype (float64 for float64
  inputs, float32 otherwise). With ``with_jacobian`` it also returns ``d logp / d hidden``.
- ``backward(hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden, need_weight,
  need_bias)`` -> ``(grad_hidden, grad_weight, grad_bias)``, each ``None`` unless asked for: the
  recompute backward used when the head is trainable.

Inputs reach the backends as the views the user passed (transposed, sliced, offset storage: any
strides); each backend reads them through their strides or copies what is cheap to copy:
- Triton kernels take every stride of hidden, weight, bias and targets: no copy.
- The chunked route (``triton`` Jacobian, ``cuda``) hands hidden and weight to cuBLAS as views and
  copies a strided targets vector (N int64s).
- The CPU backend reads hidden through its strides and makes weight and bias contiguous in the
  accumulation dtype (a V x d copy when the weight is not already contiguous fp32 / fp64; it is
  also the upcast of 16-bit weights, so it costs one pass over W per call, next to 1-3 GEMMs).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from autoregembed_fast import backends
from autoregembed_fast.backends import accumulation_dtype
from autoregembed_fast.kernels import INTERPRETING

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "reference", "cpu", "triton", "triton-fused", "cuda")


class _FrozenHeadLogprobs(torch.autograd.Function):
    """Head frozen, hidden trainable: the forward sweep also yields J = d logp / d hidden, so the
    backward is one elementwise product per token (no recompute, no second pass over the vocabulary)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, backend):
        logp, _, jacobian = backend.forward(hidden, weight, bias, targets, softcap, True)
        ctx.save_for_backward(jacobian)
        ctx.hidden_dtype = hidden.dtype
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        (jacobian,) = ctx.saved_tensors
        grad_hidden = grad_logp.to(jacobian.dtype)[:, None] * jacobian
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None


class _TrainableHeadLogprobs(torch.autograd.Function):
    """Head trainable: the forward keeps only the log-sum-exp; the backward recomputes the logits block
    by block and forms grad_hidden, grad_weight and grad_bias as needed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, backend):
        logp, lse, _ = backend.forward(hidden, weight, bias, targets, softcap, False)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap = softcap
        ctx.backend = backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = ctx.backend.backward(
            hidden, weight, bias, targets, lse, grad_logp.to(lse.dtype).contiguous(), ctx.softcap,
            need_hidden, need_weight, need_bias and bias is not None,
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def reference_token_logprobs(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    """The materialised eager computation (logits -> log_softmax -> gather), as the released
    AutoRegEmbed code and a plain Hugging Face model do it: logits in the input dtype, then float32
    (float64 for float64 inputs). Inputs are flat: hidden [N, d], targets [N]. Returns [N]."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(accumulation_dtype(hidden.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = targets != ignore_index
    safe_targets = torch.where(keep, targets, 0)
    logp = torch.log_softmax(logits, dim=-1).gather(1, safe_targets[:, None])[:, 0]
    return torch.where(keep, logp, 0.0)


class _Validated(NamedTuple):
    hidden: torch.Tensor  # [N, d]
    targets: torch.Tensor  # [N] int64
    softcap: float | None


def _validate(hidden, weight, targets, bias, ignore_index, softcap, backend) -> _Validated:
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    vocab_size, dim = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden must have shape [..., d] with d = weight.shape[1] = {dim}, got {tuple(hidden.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (vocab_size,):
        raise ValueError(f"bias must have shape [V] = ({vocab_size},), got {tuple(bias.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if bias is not None and bias.dtype != hidden.dtype:
        raise TypeError(f"bias dtype {bias.dtype} does not match hidden dtype {hidden.dtype}")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor (int64), got {targets.dtype}")
    for name, value in (("weight", weight), ("targets", targets), ("bias", bias)):
        if value is not None and value.device != hidden.device:
            raise ValueError(f"{name} is on {value.device} but hidden is on {hidden.device}")
    _check_backend_device(backend, hidden.device)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a positive number or None, got {softcap!r}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
        softcap = float(softcap)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    flat_targets = targets.reshape(-1).to(torch.int64)
    out_of_range = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= vocab_size))
    if bool(out_of_range.any()):
        bad = flat_targets[out_of_range][0].item()
        raise ValueError(
            f"targets holds {bad}, outside [0, V) = [0, {vocab_size}) and not ignore_index ({ignore_index})"
        )
    return _Validated(hidden.reshape(-1, dim), flat_targets, softcap)


def _check_backend_device(backend: str, device: torch.device) -> None:
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    # The Triton interpreter (TRITON_INTERPRET=1) runs the Triton kernels on CPU tensors.
    if backend.startswith("triton") and device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}")


def _pick_backend(backend: str, device: torch.device, dtype: torch.dtype):
    if backend == "auto":
        # CUDA: Triton when it is installed (its no-grad path needs no logits buffer at all; the
        # frozen-head route is the same chunked GEMMs for both). Not yet measured on a GPU.
        if device.type == "cpu":
            backend = "cpu"
        elif device.type == "cuda":
            backend = "triton" if _triton_available() else "cuda"
        else:
            raise ValueError(f"no backend for {device.type} tensors; use backend='reference'")
    if backend == "cuda" and not backends.cuda_extension_available():
        raise RuntimeError(
            "backend='cuda' needs autoregembed_fast._C built with CUDA (install with a CUDA build of "
            "torch and nvcc present)"
        )
    impl = {
        "cpu": backends.CpuBackend,
        "triton": lambda: backends.TritonBackend(jacobian="chunked"),
        "triton-fused": lambda: backends.TritonBackend(jacobian="fused"),
        "cuda": backends.CudaBackend,
    }[backend]()
    if dtype not in impl.dtypes:
        raise TypeError(f"backend={backend!r} supports {impl.dtypes}, got {dtype}")
    return impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_finite(logp: torch.Tensor) -> None:
    # A NaN or infinite logit anywhere in a scored row makes its log-sum-exp (hence its log p) non-finite,
    # so this N-element check covers non-finite hidden, weight and bias at no extra pass over V.
    if not bool(torch.isfinite(logp).all()):
        raise ValueError(
            "non-finite log-probabilities: hidden, weight or bias holds NaN or Inf values "
            "(or the logits overflow)"
        )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-likelihood of each target token under a linear LM head, without materialising N x V logits.

    Computes ``log_softmax(softcap(hidden @ weight.T + bias))[..., target]`` per token, where
    ``softcap(z) = c * tanh(z / c)`` when ``softcap = c`` is given (Gemma-2 style).

    Args:
        hidden: ``[..., d]`` float16 / bfloat16 / float32 / float64.
        weight: ``[V, d]``, same dtype and device as ``hidden``.
        targets: ``[...]`` (the leading shape of ``hidden``), integer; each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``, same dtype and device.
        ignore_index: targets with this value score exactly ``0.0``, get zero gradient and cost no FLOPs
            (they are removed before any GEMM).
        softcap: optional positive cap applied to the logits before the softmax.
        backend: ``"auto"`` (``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors, ``"cuda"``
            when triton is not installed), ``"cpu"`` (C++), ``"triton"`` (fused Triton kernels; the
            frozen-head Jacobian by GEMM + Triton epilogue + GEMM), ``"triton-fused"`` (the same, but
            the Jacobian by a second fused kernel: no logits buffer at all), ``"cuda"`` (GEMMs around
            a CUDA epilogue kernel) or ``"reference"`` (the materialised eager computation; the test
            oracle's twin and the benchmarks' baseline). The Triton and CUDA backends take float16,
            bfloat16 and float32 inputs.

    Returns:
        ``[...]`` log-probabilities, float32 (float64 for float64 inputs); accumulation and the softmax
        are in that dtype whatever the input dtype.

    Differentiable w.r.t. ``hidden`` and, when they require grad, ``weight`` and ``bias``; the upstream
    gradient is per token. With a frozen head the forward also computes ``d logp / d hidden`` (one
    ``d``-vector per token) and the backward is elementwise; with a trainable head the backward
    recomputes the logits block by block. Under ``torch.no_grad()`` only the log-sum-exp sweep runs.

    Raises:
        TypeError: a non-tensor argument, a non-float ``hidden``, mismatched dtypes, non-integer
            targets, a dtype the chosen backend does not take.
        ValueError: mismatched shapes or devices, a target outside ``[0, V)``, non-finite values in
            ``hidden`` / ``weight`` / ``bias``, a bad ``softcap``, an unknown backend or one that
            cannot run on the tensors' device.
        RuntimeError: ``backend="cuda"`` without the CUDA build of the extension.
    """
    flat_hidden, flat_targets, softcap = _validate(
        hidden, weight, targets, bias, ignore_index, softcap, backend
    )
    out_dtype = accumulation_dtype(hidden.dtype)
    if flat_targets.numel() == 0:
        return torch.zeros(targets.shape, dtype=out_dtype, device=hidden.device)

    keep = flat_targets != ignore_index
    if backend == "reference":
        logp = reference_token_logprobs(flat_hidden, weight, flat_targets, bias, ignore_index, softcap)
        _check_finite(logp[keep])
        return logp.reshape(targets.shape)

    impl = _pick_backend(backend, hidden.device, hidden.dtype)
    kept_index = keep.nonzero().squeeze(1)
    compacted = kept_index.numel() < flat_targets.numel()
    if compacted:
        flat_hidden = flat_hidden.index_select(0, kept_index)
        flat_targets = flat_targets.index_select(0, kept_index)

    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or head_trainable):
        logp, _, _ = impl.forward(flat_hidden, weight, bias, flat_targets, softcap, False)
    elif head_trainable:
        logp = _TrainableHeadLogprobs.apply(flat_hidden, weight, bias, flat_targets, softcap, impl)
    else:
        logp = _FrozenHeadLogprobs.apply(flat_hidden, weight, bias, flat_targets, softcap, impl)
    _check_finite(logp)

    if compacted:
        logp = torch.zeros(keep.shape, dtype=logp.dtype, device=logp.device).index_put(
            (kept_index,), logp
        )
    return logp.reshape(targets.shape)
