"""Per-token log-likelihood under a linear LM head, without materialising the N x V logits.

`token_logprobs` is the public op, `summed_token_logprobs` its sum for scalar losses; everything else
here is their validation, backend dispatch and autograd. A backend provides three calls on compacted
inputs (ignored tokens already removed):

- ``forward(hidden [N, d], weight [V, d], bias [V] | None, targets [N], softcap, with_jacobian)``
  -> ``(logp [N], lse [N], jacobian [N, d] | None)``, in the accumulation dtype (float64 for float64
  inputs, float32 otherwise). With ``with_jacobian`` it also returns ``d logp / d hidden``.
- ``backward(hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden, need_weight,
  need_bias)`` -> ``(grad_hidden, grad_weight, grad_bias)``, each ``None`` unless asked for: the
  recompute backward used when the head is trainable.
- ``summed_grads(hidden, weight, bias, targets, softcap, need_hidden, need_head)`` -> ``(logp,
  grad_hidden | None, grad_weight | None, grad_bias | None)``: the gradients of ``sum(logp)``, formed
  in the forward sweep where the backend can (CPU and `chunked-triton`'s chunked route: 3
  GEMM-equivalents, no recompute; the others recompute with a unit upstream gradient).

Inputs reach the backends as the views the user passed (transposed, sliced, offset storage: any
strides); each backend reads them through their strides or copies what is cheap to copy:
- Triton kernels take every stride of hidden, weight, bias and targets: no copy.
- The chunked route (``chunked-triton``'s Jacobian and scalar losses, ``chunked-cuda``) hands hidden
  and weight to cuBLAS as views and copies a strided targets vector (N int64s).
- The CPU backend reads hidden through its strides. For fp32 / fp64 GEMMs it makes weight and bias
  contiguous in the accumulation dtype (a V x d copy when the weight is not already contiguous
  fp32 / fp64, which is also the upcast of 16-bit weights on CPUs without AVX512-BF16); on CPUs with
  AVX512-BF16, bf16 weights are instead packed once per call for the package's bf16 GEMM (fp32
  products and sums). Either way one pass over W per call, next to 1-3 GEMMs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from autoregembed_fast import backends
from autoregembed_fast.backends import accumulation_dtype
from autoregembed_fast.kernels import INTERPRETING

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Named by algorithm: "chunked-*" = GEMMs on blocks of tokens x vocabulary around an epilogue kernel
# (Triton or CUDA), "fused-triton" = streaming Triton kernels only, no logits buffer.
BACKENDS = ("auto", "reference", "cpu", "chunked-triton", "fused-triton", "chunked-cuda")
# The names of the first releases (by technology), still accepted.


# The op is registered with torch.library so that torch.compile traces through it (fullgraph, dynamic
# N): everything that depends on tensor values (dropping ignored tokens, the target-range and finiteness
# checks, the backend's launches) happens inside it, where no tracer looks; its fake implementations
# give the output shapes, which depend on the input shapes only. Ignored tokens get log p = 0 and zero
# gradients.


def _compacted(hidden, targets, ignore_index):
    """(kept row index or None when every token is scored, hidden and targets of the kept rows)."""
    keep = targets != ignore_index
    if bool(keep.all()):
        return None, hidden, targets
    kept = keep.nonzero().squeeze(1)
    return kept, hidden.index_select(0, kept), targets.index_select(0, kept)


def _scattered(kept, values, n_rows):
    """values of the kept rows back in place among n_rows rows, zeros elsewhere."""
    if kept is None:
        return values
    return values.new_zeros((n_rows, *values.shape[1:])).index_put_((kept,), values)


def _check_target_range(targets, ignore_index, vocab_size) -> None:
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"targets holds {bad}, outside [0, V) = [0, {vocab_size}) and not ignore_index ({ignore_index})"
        )


def _on_scored_tokens(hidden, weight, targets, ignore_index, backend, compute, no_tokens):
    """The steps the three ops share: the target-range check, the compaction of ignored tokens, then
    `compute(impl, hidden, targets, kept)` on the scored tokens only, or `no_tokens(hidden)` (the
    results for zero rows) when there are none. Returns (kept row index or None, result).
    A backend's GEMMs run in the dtype it was given: autocast must not lower them."""
    _check_target_range(targets, ignore_index, weight.shape[0])
    kept, hidden, targets = _compacted(hidden, targets, ignore_index)
    if targets.numel() == 0:
        return kept, no_tokens(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        impl = _pick_backend(backend, hidden.device, hidden.dtype)
        return kept, compute(impl, hidden, targets, kept)


@torch.library.custom_op("autoregembed_fast::token_logprobs", mutates_args=())
def _token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, softcap: float | None, backend: str, with_jacobian: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p [N], lse [N], d log p / d hidden [N, d] with_jacobian else [0]) of flat inputs of one
    dtype, in the accumulation dtype; 0 (and zero Jacobian rows) for ignored tokens."""
    n_rows, out_dtype = hidden.shape[0], accumulation_dtype(hidden.dtype)

    def compute(impl, hidden, targets, kept):
        logp, lse, jacobian = impl.forward(hidden, weight, bias, targets, softcap, with_jacobian)
        _check_finite(logp)
        return logp, lse, jacobian

    def no_tokens(hidden):
        return (hidden.new_zeros(0, dtype=out_dtype), hidden.new_zeros(0, dtype=out_dtype),
                hidden.new_zeros((0, hidden.shape[1]), dtype=out_dtype) if with_jacobian else None)

    kept, (logp, lse, jacobian) = _on_scored_tokens(hidden, weight, targets, ignore_index, backend,
                                                    compute, no_tokens)
    jacobian = _scattered(kept, jacobian, n_rows) if with_jacobian else logp.new_empty(0)
    return _scattered(kept, logp, n_rows), _scattered(kept, lse, n_rows), jacobian


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, ignore_index, softcap, backend, with_jacobian):
    out_dtype = accumulation_dtype(hidden.dtype)
    n_rows = hidden.shape[0]
    jacobian = hidden.new_empty((n_rows, hidden.shape[1]) if with_jacobian else (0,), dtype=out_dtype)
    return hidden.new_empty(n_rows, dtype=out_dtype), hidden.new_empty(n_rows, dtype=out_dtype), jacobian


@torch.library.custom_op("autoregembed_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    lse: torch.Tensor, grad_logp: torch.Tensor, ignore_index: int, softcap: float | None, backend: str,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainable-head backward: (grad hidden, grad weight, grad bias) in the inputs' dtypes, each
    an empty [0] tensor unless asked for. Recomputes the logits block by block from the saved lse."""
    n_rows = hidden.shape[0]
    need_bias = need_bias and bias is not None

    def compute(impl, hidden, targets, kept):
        scored_lse, scored_grad = ((lse, grad_logp) if kept is None else
                                   (lse.index_select(0, kept), grad_logp.index_select(0, kept)))
        return impl.backward(hidden, weight, bias, targets, scored_lse,
                             scored_grad.to(lse.dtype).contiguous(), softcap, need_hidden,
                             need_weight, need_bias)

    kept, (grad_hidden, grad_weight, grad_bias) = _on_scored_tokens(
        hidden, weight, targets, ignore_index, backend, compute, lambda hidden: (None, None, None))
    # Nothing scored: zero gradients (a backend returns None for what it was not asked).
    if need_hidden:
        grad_hidden = _scattered(kept, (hidden.new_zeros(0, hidden.shape[1]) if grad_hidden is None
                                        else grad_hidden.to(hidden.dtype)), n_rows)
    if need_weight:
        grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
    if need_bias:
        grad_bias = torch.zeros_like(bias) if grad_bias is None else grad_bias.to(bias.dtype)
    empty = hidden.new_empty(0)
    return (grad_hidden if need_hidden else empty, grad_weight if need_weight else empty.clone(),
            grad_bias if need_bias else empty.clone())


@_token_logprobs_backward_op.register_fake
def _token_logprobs_backward_fake(hidden, weight, bias, targets, lse, grad_logp, ignore_index, softcap,
                                  backend, need_hidden, need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            hidden.new_empty(bias.shape if need_bias and bias is not None else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, backend, with_jacobian = inputs
    _, lse, jacobian = output
    ctx.with_jacobian = with_jacobian
    ctx.hidden_dtype = hidden.dtype
    ctx.settings = (ignore_index, softcap, backend)
    if with_jacobian:
        # Head frozen, hidden trainable: the forward sweep also yielded J = d logp / d hidden, so
        # the backward is one elementwise product per token (no second pass over the vocabulary).
        ctx.save_for_backward(jacobian)
    else:
        # Head trainable: only the log-sum-exp was kept; the backward recomputes the logits.
        ctx.save_for_backward(hidden, weight, bias, targets, lse)


def _backward(ctx, grad_logp, grad_lse, grad_jacobian):
    no_grad = (None,) * 5
    if ctx.with_jacobian:
        (jacobian,) = ctx.saved_tensors
        grad_hidden = grad_logp.to(jacobian.dtype)[:, None] * jacobian
        return (grad_hidden.to(ctx.hidden_dtype), None, None, *no_grad)
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_hidden, grad_weight, grad_bias = _token_logprobs_backward_op(
        hidden, weight, bias, targets, lse, grad_logp, *ctx.settings,
        need_hidden, need_weight, need_bias)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias and bias is not None else None, *no_grad)


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("autoregembed_fast::summed_token_logprobs", mutates_args=())
def _summed_token_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, softcap: float | None, backend: str, need_hidden: bool, need_head: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of log p over scored tokens [], and its gradients w.r.t. hidden [N, d], weight [V, d] and
    bias [V], each an empty [0] tensor unless asked for), all in the accumulation dtype."""
    n_rows, out_dtype = hidden.shape[0], accumulation_dtype(hidden.dtype)
    need_bias = need_head and bias is not None

    def compute(impl, hidden, targets, kept):
        logp, grad_hidden, grad_weight, grad_bias = impl.summed_grads(
            hidden, weight, bias, targets, softcap, need_hidden, need_head)
        _check_finite(logp)
        return logp, grad_hidden, grad_weight, grad_bias

    def no_tokens(hidden):
        zeros = dict(dtype=out_dtype, device=hidden.device)
        return (torch.zeros(0, **zeros), torch.zeros(0, hidden.shape[1], **zeros),
                torch.zeros(weight.shape, **zeros) if need_head else None,
                torch.zeros(weight.shape[0], **zeros) if need_bias else None)

    kept, (logp, grad_hidden, grad_weight, grad_bias) = _on_scored_tokens(
        hidden, weight, targets, ignore_index, backend, compute, no_tokens)
    empty = hidden.new_empty(0, dtype=out_dtype)
    return (logp.sum(), _scattered(kept, grad_hidden, n_rows) if need_hidden else empty,
            grad_weight if need_head else empty.clone(), grad_bias if need_bias else empty.clone())


@_summed_token_logprobs_op.register_fake
def _summed_token_logprobs_fake(hidden, weight, bias, targets, ignore_index, softcap, backend,
                                need_hidden, need_head):
    out_dtype = accumulation_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=out_dtype),
            hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=out_dtype),
            hidden.new_empty(weight.shape if need_head else (0,), dtype=out_dtype),
            hidden.new_empty(bias.shape if need_head and bias is not None else (0,), dtype=out_dtype))


def _summed_setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.backward_done = False
    ctx.save_for_backward(*output[1:])
    # The gradient outputs are never differentiated: without this, autograd would materialise a zero
    # upstream gradient for each of them in the backward, one more [V, d] tensor at the peak.
    ctx.set_materialize_grads(False)


def _summed_backward(ctx, grad_total, *unused):
    # The gradients were formed in the forward for a unit upstream gradient: scale them in place, so
    # that a [V, d] head gradient exists once (the saved tensor is released after this node and
    # becomes the parameter's .grad without a copy), as Liger's fused linear cross-entropy does.
    if ctx.backward_done:
        raise RuntimeError(
            "summed_token_logprobs (linear_cross_entropy with reduction 'mean' / 'sum') forms its "
            "gradients in the forward and scales them in place in the backward: it cannot be "
            "backpropagated twice (retain_graph=True). Use token_logprobs(...).sum() for that.")
    ctx.backward_done = True
    if grad_total is None:
        return (None,) * 9
    grads = []
    for grad, dtype, needed in zip(ctx.saved_tensors, ctx.dtypes, ctx.needs_input_grad[:3]):
        grads.append(grad.mul_(grad_total.to(grad.dtype)).to(dtype) if needed and grad.numel() else None)
    return (*grads, None, None, None, None, None, None)


_summed_token_logprobs_op.register_autograd(_summed_backward, setup_context=_summed_setup_context)


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
    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N] int64
    softcap: float | None
    backend: str


def _compute_dtype(hidden, weight, bias) -> torch.dtype:
    """The dtype the op computes in. Under autocast: the autocast dtype, as `lm_head` would (fp64
    inputs stay fp64, as autocast leaves them). Otherwise torch's type promotion of hidden, weight and
    bias: a bf16 hidden with an fp32 head computes in fp32 (hidden upcast, [N, d]), a bf16 head with an
    fp32 hidden too (head upcast, [V, d])."""
    tensors = [hidden, weight] + ([] if bias is None else [bias])
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        dtypes = [t.dtype if t.dtype == torch.float64 else autocast_dtype for t in tensors]
    else:
        dtypes = [t.dtype for t in tensors]
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def _validate(hidden, weight, targets, bias, ignore_index, softcap, backend) -> _Validated:
    """Checks what does not depend on tensor values (types, shapes, dtypes, devices, settings), so it
    runs the same under torch.compile; the target range and finiteness are checked inside the op.
    Returns flat inputs cast to the compute dtype (differentiably) and the backend's name."""
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
    for name, value in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if value is not None and value.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
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
    dtype = _compute_dtype(hidden, weight, bias)
    return _Validated(hidden.reshape(-1, dim).to(dtype), weight.to(dtype),
                      None if bias is None else bias.to(dtype), targets.reshape(-1).to(torch.int64),
                      softcap, backend)


def _check_backend_device(backend: str, device: torch.device) -> None:
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    # The Triton interpreter (TRITON_INTERPRET=1) runs the Triton kernels on CPU tensors.
    if backend.endswith("triton") and device.type != "cuda" and not INTERPRETING:
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}")
    if backend == "chunked-cuda" and device.type != "cuda":
        raise ValueError(f"backend={backend!r} needs CUDA tensors, got tensors on {device}")


def _pick_backend(backend: str, device: torch.device, dtype: torch.dtype):
    if backend == "auto":
        # CUDA: Triton when it is installed (its no-grad path needs no logits buffer at all; the
        # frozen-head route is the same chunked GEMMs for both). Not yet measured on a GPU.
        if device.type == "cpu":
            backend = "cpu"
        elif device.type == "cuda":
            backend = "chunked-triton" if _triton_available() else "chunked-cuda"
        else:
            raise ValueError(f"no backend for {device.type} tensors; use backend='reference'")
    if backend == "chunked-cuda" and not backends.cuda_extension_available():
        raise RuntimeError(
            "backend='chunked-cuda' needs autoregembed_fast._C built with CUDA (install with a CUDA "
            "build of torch and nvcc present)"
        )
    impl = {
        "cpu": backends.CpuBackend,
        "chunked-triton": lambda: backends.TritonBackend(route="chunked"),
        "fused-triton": lambda: backends.TritonBackend(route="fused"),
        "chunked-cuda": backends.CudaBackend,
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
        weight: ``[V, d]``, a float dtype, on the device of ``hidden``.
        targets: ``[...]`` (the leading shape of ``hidden``), integer; each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``, a float dtype, same device.
        ignore_index: targets with this value score exactly ``0.0``, get zero gradient and cost no FLOPs
            (they are removed before any GEMM).
        softcap: optional positive cap applied to the logits before the softmax.
        backend: ``"auto"`` (``"cpu"`` for CPU tensors, ``"chunked-triton"`` for CUDA tensors,
            ``"chunked-cuda"`` when triton is not installed), ``"cpu"`` (BLAS GEMMs on token blocks
            around a C++ epilogue), ``"chunked-triton"`` (the fused Triton log-sum-exp kernel; the
            frozen-head Jacobian and scalar losses by cuBLAS GEMM chunks + Triton epilogue + GEMM),
            ``"fused-triton"`` (Triton kernels only: the Jacobian by a second fused kernel, no
            logits buffer at all), ``"chunked-cuda"`` (cuBLAS GEMM chunks around a CUDA epilogue
            kernel) or ``"reference"`` (the materialised eager computation; the test oracle's twin
            and the benchmarks' baseline). The GPU backends take float16,
            bfloat16 and float32 inputs.

    Dtypes: outside autocast the op computes in the type promotion of hidden, weight and bias (a
    bf16 ``hidden`` with an fp32 head computes in fp32); under ``torch.autocast`` in the autocast
    dtype, as the model's ``lm_head`` would (float64 inputs stay float64). Gradients come back in
    each input's own dtype.

    Returns:
        ``[...]`` log-probabilities, float32 (float64 when computing in float64); accumulation and the
        softmax are in that dtype whatever the input dtype.

    Works under ``torch.compile`` (one graph, dynamic N): the computation is the custom op
    ``autoregembed_fast::token_logprobs``; the value checks below run inside it.

    Differentiable w.r.t. ``hidden`` and, when they require grad, ``weight`` and ``bias``; the upstream
    gradient is per token. With a frozen head the forward also computes ``d logp / d hidden`` (one
    ``d``-vector per token) and the backward is elementwise; with a trainable head the backward
    recomputes the logits block by block. Under ``torch.no_grad()`` only the log-sum-exp sweep runs.

    Raises:
        TypeError: a non-tensor argument, a non-float ``hidden`` / ``weight`` / ``bias``, non-integer
            targets, a (computed) dtype the chosen backend does not take.
        ValueError: mismatched shapes or devices, a target outside ``[0, V)``, non-finite values in
            ``hidden`` / ``weight`` / ``bias``, a bad ``softcap``, an unknown backend or one that
            cannot run on the tensors' device.
        RuntimeError: ``backend="chunked-cuda"`` without the CUDA build of the extension.
    """
    flat_hidden, weight, bias, flat_targets, softcap, backend = _validate(
        hidden, weight, targets, bias, ignore_index, softcap, backend
    )
    if backend == "reference":
        # Value checks synchronise with the device: eager only (the op checks them everywhere).
        checked = not torch.compiler.is_compiling()
        if checked:
            _check_target_range(flat_targets, ignore_index, weight.shape[0])
        logp = reference_token_logprobs(flat_hidden, weight, flat_targets, bias, ignore_index, softcap)
        if checked:
            _check_finite(logp[flat_targets != ignore_index])
        return logp.reshape(targets.shape)

    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    needs_grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or head_trainable)
    logp, _, _ = _token_logprobs_op(flat_hidden, weight, bias, flat_targets, ignore_index, softcap,
                                    backend, needs_grad and not head_trainable)
    return logp.reshape(targets.shape)


def summed_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``token_logprobs(...).sum()`` (a scalar, the sum over scored tokens) for losses that reduce
    over tokens: since every token's upstream gradient is the same scalar, the gradients are formed in
    the forward sweep and the backward only scales them. On the CPU backend and `chunked-triton`
    that makes a trainable head cost 3 GEMM-equivalents (logits, grad_hidden, grad_weight)
    instead of the recompute path's 4; `fused-triton` and `chunked-cuda` run their lse sweep and recompute
    inside the forward (the per-token path's cost). The gradients of the inputs that need one are
    held from the forward to the backward ([N, d] and [V, d] in the accumulation dtype) and scaled
    there in place, so it cannot be backpropagated twice (``retain_graph=True`` raises). Same
    arguments, dtypes and errors as `token_logprobs`; without gradients (or with
    ``backend="reference"``) it is that sum.
    """
    flat_hidden, weight, bias, flat_targets, softcap, backend = _validate(
        hidden, weight, targets, bias, ignore_index, softcap, backend
    )
    head_trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if backend == "reference" or not torch.is_grad_enabled() or not (
            flat_hidden.requires_grad or head_trainable):
        return token_logprobs(flat_hidden, weight, flat_targets, bias=bias, ignore_index=ignore_index,
                              softcap=softcap, backend=backend).sum()
    total, _, _, _ = _summed_token_logprobs_op(flat_hidden, weight, bias, flat_targets, ignore_index,
                                               softcap, backend, flat_hidden.requires_grad,
                                               head_trainable)
    return total
