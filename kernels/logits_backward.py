"""Recompute backward: gradients of sum_t g_t log p_t w.r.t. hidden, weight and bias.

Each program owns one (BLOCK_N tokens) x (BLOCK_V vocabulary) tile: it recomputes the logits tile,
turns it into the coefficients G = g * (onehot(target) - softmax) * softcap' (the log-sum-exp comes from
the forward), and adds G @ W[tile] into grad_hidden and G^T @ H[tile] into grad_weight (fp32 atomics,
since several programs share each output row), plus G's column sums into grad_bias. Nothing of size
N x V is ever written. The atomics are relaxed: each is an independent accumulation, ordered with
nothing else, so they need no acquire/release fences. Programs run in grouped order (`grouped_tile`),
so that the token tiles and vocabulary tiles re-read by neighbouring programs stay in L2.

With no upstream gradient (g = 1) and only grad_hidden requested, the same kernel computes the
frozen-head Jacobian rows d log p / d hidden: the "fused" Jacobian route (3 GEMM-equivalents with the
forward, no logits buffer at all).
"""

import torch
import triton
import triton.language as tl

from autoregembed_fast.kernels import on_device, operand_kind, token_bucket
from autoregembed_fast.kernels.autotuning import tuned_by_operand_kind
from autoregembed_fast.kernels.tl_utils import (
    INTERPRETING, apply_softcap, grouped_tile, logits_tile, softcap_slope, tile_indices,
)


@triton.jit(do_not_specialize=["n_bucket"])
def _logits_backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, grad_ptr,
    grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t, softcap, n_bucket,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
    NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # n_bucket is unused by the body: it is part of the autotuning key (see `token_bucket`).
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    rows = tile_indices(pid_n, BLOCK_N)
    cols = tile_indices(pid_v, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V

    logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                         stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                         BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST)
    logits = apply_softcap(logits, softcap, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GRAD:
        grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    else:
        grad = tl.where(row_mask, 1.0, 0.0)
    targets = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=-1)
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    probs = tl.exp(logits - lse[:, None])
    coeff = grad[:, None] * (onehot - probs) * softcap_slope(logits, softcap, HAS_SOFTCAP)
    coeff = tl.where(row_mask[:, None] & col_mask[None, :], coeff, 0.0)

    if NEED_BIAS:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(coeff, axis=0), mask=col_mask, sem="relaxed")
    if UPCAST:
        coeff_dot = coeff
    else:
        coeff_dot = coeff.to(hidden_ptr.dtype.element_ty)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        if NEED_HIDDEN:
            w = tl.load(weight_ptr + cols[:, None] * stride_wv + dims[None, :] * stride_wd,
                        mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            tl.atomic_add(grad_hidden_ptr + rows[:, None] * D + dims[None, :],
                          tl.dot(coeff_dot, w, input_precision="ieee"),
                          mask=row_mask[:, None] & dim_mask[None, :], sem="relaxed")
        if NEED_WEIGHT:
            h = tl.load(hidden_ptr + rows[:, None] * stride_hn + dims[None, :] * stride_hd,
                        mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            tl.atomic_add(grad_weight_ptr + cols[:, None] * D + dims[None, :],
                          tl.dot(tl.trans(coeff_dot), h, input_precision="ieee"),
                          mask=col_mask[:, None] & dim_mask[None, :], sem="relaxed")


# 16-bit operands use tensor cores; fp32 operands (exact fp32 dots) keep operands in registers, so
# their tiles are smaller. Every config is compiled for sm_90 in CI, where a config that spills
# registers fails (tests/test_kernels.py): the 128x128 tile steps D by 32 in 2 stages for that (with
# D steps of 64, or 3 stages, the trainable-head variant spilled 20-32 bytes).
GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32, "GROUP": 8}, num_warps=8,
                  num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "GROUP": 8}, num_warps=4,
                  num_stages=3),
]
GPU_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP": 8}, num_warps=8,
                  num_stages=2),
]
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32, "GROUP": 2})]
RESET_TO_ZERO = ["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"]
# One autotuner per operand kind ("16-bit" or "fp32"), each over its own configs. The outputs are
# accumulated with atomics, so trial runs re-zero them.
TUNED = tuned_by_operand_kind(_logits_backward_kernel, GPU_CONFIGS_16BIT, GPU_CONFIGS_FP32,
                              INTERPRETER_CONFIGS, reset_to_zero=RESET_TO_ZERO)


def logits_backward(hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                    need_weight, need_bias):
    """(grad_hidden [N, d], grad_weight [V, d], grad_bias [V]), fp32 and contiguous, each None unless
    requested.

    hidden [N, d], weight [V, d], bias [V] | None and targets [N] may be any strided views; lse [N]
    fp32 comes from the forward; grad_logp [N] fp32 is the per-token upstream gradient, None meaning 1
    for every token (the Jacobian).
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
    if n_tokens > 0:  # otherwise there is no grid to launch and the gradients are zero
        args = (
            hidden, weight, bias, targets, lse.contiguous(),
            None if grad_logp is None else grad_logp.contiguous(),
            grad_hidden, grad_weight, grad_bias, n_tokens, vocab_size, dim,
            *hidden.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
            targets.stride(0), float(softcap or 0.0), token_bucket(n_tokens),
        )
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n_tokens, meta["BLOCK_N"]) * triton.cdiv(vocab_size, meta["BLOCK_V"]),)
        with on_device(hidden):
            TUNED[operand_kind(hidden.dtype)][grid](
                *args, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
                HAS_GRAD=grad_logp is not None, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
                NEED_BIAS=need_bias, UPCAST=INTERPRETING)
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None)
