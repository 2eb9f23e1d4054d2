"""Recompute backward: gradients of sum_t g_t log p_t w.r.t. hidden, weight and bias.

Each program owns one (BLOCK_N tokens) x (BLOCK_V vocabulary) tile: it recomputes the logits tile,
turns it into the coefficients G = g * (onehot(target) - softmax) * softcap' (the log-sum-exp comes from
the forward), and adds G @ W[tile] into grad_hidden and G^T @ H[tile] into grad_weight (fp32 atomics,
since several programs share each output row), plus G's column sums into grad_bias. Nothing of size
N x V is ever written.

With no upstream gradient (g = 1) and only grad_hidden requested, the same kernel computes the
frozen-head Jacobian rows d log p / d hidden: the "fused" Jacobian route (3 GEMM-equivalents with the
forward, no logits buffer at all).
"""

import torch
import triton
import triton.language as tl

from autoregembed_fast.kernels.tl_utils import (
    INTERPRETING, apply_softcap, logits_tile, softcap_slope,
)


@triton.jit
def _logits_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    N, V, D, stride_h, stride_w, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V

    logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                         stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST)
    logits = apply_softcap(logits, softcap, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GRAD:
        grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    else:
        grad = tl.where(row_mask, 1.0, 0.0)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    probs = tl.exp(logits - lse[:, None])
    coeff = grad[:, None] * (onehot - probs) * softcap_slope(logits, softcap, HAS_SOFTCAP)
    coeff = tl.where(row_mask[:, None] & col_mask[None, :], coeff, 0.0)

    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(coeff, axis=0), mask=col_mask)
    if UPCAST:
        coeff_dot = coeff
    else:
        coeff_dot = coeff.to(hidden_ptr.dtype.element_ty)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        if NEED_HIDDEN:
            w = tl.load(weight_ptr + cols[:, None] * stride_w + dims[None, :],
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            tl.atomic_add(grad_hidden_ptr + rows[:, None] * D + dims[None, :],
                          tl.dot(coeff_dot, w, input_precision="ieee"),
                          mask=row_mask[:, None] & dim_mask[None, :])
        if NEED_WEIGHT:
            h = tl.load(hidden_ptr + rows[:, None] * stride_h + dims[None, :],
                        mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            tl.atomic_add(grad_weight_ptr + cols[:, None] * D + dims[None, :],
                          tl.dot(tl.trans(coeff_dot), h, input_precision="ieee"),
                          mask=col_mask[:, None] & dim_mask[None, :])


GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=3),
]
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}

# The outputs are accumulated with atomics, so autotuning must re-zero them between trial runs.
_logits_backward_tuned = triton.autotune(
    configs=GPU_CONFIGS, key=["D", "V"],
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"],
)(_logits_backward_kernel)


def _launch(args, flags, n_tokens, vocab_size):
    if INTERPRETING:
        grid = (triton.cdiv(n_tokens, INTERPRETER_CONFIG["BLOCK_N"]),
                triton.cdiv(vocab_size, INTERPRETER_CONFIG["BLOCK_V"]))
        _logits_backward_kernel[grid](*args, **INTERPRETER_CONFIG, **flags)
    else:
        grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]),  # noqa: E731
                             triton.cdiv(vocab_size, meta["BLOCK_V"]))
        _logits_backward_tuned[grid](*args, **flags)


def logits_backward(hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                    need_weight, need_bias):
    """(grad_hidden [N, d], grad_weight [V, d], grad_bias [V]), fp32, each None unless requested.

    grad_logp [N] fp32 is the per-token upstream gradient; None means 1 for every token (Jacobian).
    """
    n_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    device = hidden.device

    def output(needed, shape):
        # Unused outputs still get a (one-element) buffer so the autotuner can zero every output.
        return torch.zeros(shape if needed else (1,), dtype=torch.float32, device=device)

    grad_hidden = output(need_hidden, (n_tokens, dim))
    grad_weight = output(need_weight, (vocab_size, dim))
    grad_bias = output(need_bias, (vocab_size,))
    args = (
        hidden, weight, bias, targets, lse, grad_logp, grad_hidden, grad_weight, grad_bias,
        n_tokens, vocab_size, dim, hidden.stride(0), weight.stride(0), float(softcap or 0.0),
    )
    flags = {
        "HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None,
        "HAS_GRAD": grad_logp is not None, "NEED_HIDDEN": need_hidden,
        "NEED_WEIGHT": need_weight, "NEED_BIAS": need_bias, "UPCAST": INTERPRETING,
    }
    if n_tokens > 0:  # otherwise there is no grid to launch and the gradients are zero
        _launch(args, flags, n_tokens, vocab_size)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None)
