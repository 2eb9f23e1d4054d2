"""Fused epilogues over a chunk of logits already in memory: the chunked route's middle step.

The chunked route tiles the work into (R tokens) x (Vc vocabulary) chunks whose logits come from the
platform GEMM (cuBLAS); these kernels turn a chunk into what the next GEMM needs. One program per token
row streams over its Vc logits.

- `online_softmax_chunk` (forward, flash-attention style): applies the softcap in place, updates the
  row's running max / sum-exp, picks up the target's logit if the target lies in the chunk, and writes
  the unnormalised weights exp(z - new_max) * softcap'(z) of every column but the target's (0 there)
  plus the rescale factor alpha = exp(old_max - new_max). The driver then forms
  acc <- alpha * acc + weights @ W_chunk, and at the end
  d log p / d hidden = softcap'(z_target) (1 - p_target) W[target] - acc / sum_exp.
  Keeping the target's term out of the (possibly bf16) weights and forming 1 - p_target in fp32 keeps
  the error proportional to the gradient when the softmax is peaked (a confident token), as in eager
  autograd. 2 GEMM-equivalents in all, and only one chunk of logits in memory, whatever V is.
- `grad_coefficients_chunk` (recompute backward, log-sum-exp known): writes
  g * (onehot(target) - exp(z - lse)) * softcap'(z) for the raw logits z of the chunk. The trainable
  head's one-sweep route for scalar losses runs it right after `online_softmax_chunk` on a block
  holding whole vocabulary rows (logits already capped, lse final).
"""

import triton
import triton.language as tl

from autoregembed_fast.kernels import on_device
from autoregembed_fast.kernels.tl_utils import INTERPRETING, apply_softcap, softcap_slope


@triton.jit
def _online_softmax_chunk_kernel(
    logits_ptr, weights_ptr, alpha_ptr, targets_ptr, running_max_ptr, running_sumexp_ptr,
    target_logit_ptr, Vc, col_offset, stride_logits, stride_weights, stride_t, softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WRITE_WEIGHTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + row * stride_t) - col_offset

    chunk_max = float("-inf")
    for v_start in range(0, Vc, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < Vc
        z = tl.load(logits_row + cols, mask=col_mask, other=0.0)
        if HAS_SOFTCAP:
            z = apply_softcap(z, softcap, HAS_SOFTCAP)
            tl.store(logits_row + cols, z, mask=col_mask)
        chunk_max = tl.maximum(chunk_max, tl.max(tl.where(col_mask, z, float("-inf")), axis=0))

    old_max = tl.load(running_max_ptr + row)
    new_max = tl.maximum(old_max, chunk_max)
    chunk_sumexp = 0.0
    target_logit = 0.0
    for v_start in range(0, Vc, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < Vc
        z = tl.load(logits_row + cols, mask=col_mask, other=0.0)
        unnormalised = tl.where(col_mask, tl.exp(z - new_max), 0.0)
        chunk_sumexp += tl.sum(unnormalised, axis=0)
        target_logit += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
        if WRITE_WEIGHTS:
            # The target's own term is left to the driver, which forms it in fp32 at the end.
            weights = tl.where(cols == target, 0.0,
                               unnormalised * softcap_slope(z, softcap, HAS_SOFTCAP))
            tl.store(weights_ptr + row * stride_weights + cols, weights, mask=col_mask)

    alpha = tl.exp(old_max - new_max)
    tl.store(running_max_ptr + row, new_max)
    tl.store(running_sumexp_ptr + row, tl.load(running_sumexp_ptr + row) * alpha + chunk_sumexp)
    tl.store(target_logit_ptr + row, tl.load(target_logit_ptr + row) + target_logit)
    if WRITE_WEIGHTS:
        tl.store(alpha_ptr + row, alpha)


@triton.jit
def _grad_coefficients_chunk_kernel(
    logits_ptr, coeff_ptr, targets_ptr, lse_ptr, grad_ptr, Vc, col_offset, stride_logits,
    stride_coeff, stride_t, softcap, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    LOGITS_CAPPED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    coeff_row = coeff_ptr + row * stride_coeff
    target = tl.load(targets_ptr + row * stride_t) - col_offset
    lse = tl.load(lse_ptr + row)
    grad = tl.load(grad_ptr + row)
    for v_start in range(0, Vc, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < Vc
        z = tl.load(logits_row + cols, mask=col_mask, other=0.0)
        if not LOGITS_CAPPED:
            z = apply_softcap(z, softcap, HAS_SOFTCAP)
        onehot = tl.where(cols == target, 1.0, 0.0)
        coeff = grad * (onehot - tl.exp(z - lse)) * softcap_slope(z, softcap, HAS_SOFTCAP)
        tl.store(coeff_row + cols, coeff, mask=col_mask)


GPU_BLOCK_V = 2048
INTERPRETER_BLOCK_V = 256


def _block_v() -> int:
    return INTERPRETER_BLOCK_V if INTERPRETING else GPU_BLOCK_V


def online_softmax_chunk(logits, targets, col_offset, softcap, running_max, running_sumexp,
                         target_logit, weights_out=None, alpha_out=None):
    """One forward step of the chunked route over logits [R, Vc] fp32 (unit column stride) holding
    vocabulary columns [col_offset, col_offset + Vc); targets [R] int64 (any stride). Updates
    running_max, running_sumexp and target_logit ([R] fp32, contiguous) in place; with weights_out
    [R, Vc] (any float dtype, unit column stride; may be `logits`) also writes the unnormalised
    weights (0 at the target's column) and alpha_out [R]."""
    rows, chunk = logits.shape
    if rows == 0:
        return
    write_weights = weights_out is not None
    with on_device(logits):
        _online_softmax_chunk_kernel[(rows,)](
            logits, weights_out, alpha_out, targets, running_max, running_sumexp, target_logit,
            chunk, col_offset, logits.stride(0), weights_out.stride(0) if write_weights else 0,
            targets.stride(0), float(softcap or 0.0), BLOCK_V=_block_v(),
            HAS_SOFTCAP=softcap is not None, WRITE_WEIGHTS=write_weights, num_warps=8,
        )


def grad_coefficients_chunk(logits, targets, col_offset, softcap, lse, grad_logp, coeff_out,
                            logits_capped=False):
    """Recompute-backward step over raw logits [R, Vc] fp32 for columns [col_offset, col_offset + Vc):
    writes grad_logp * (onehot(target) - exp(capped - lse)) * softcap' into coeff_out [R, Vc] (may be
    `logits`). With `logits_capped` the logits are already capped (as `online_softmax_chunk` leaves
    them): the cap is not applied again, its slope still is."""
    rows, chunk = logits.shape
    if rows == 0:
        return
    with on_device(logits):
        _grad_coefficients_chunk_kernel[(rows,)](
            logits, coeff_out, targets, lse, grad_logp, chunk, col_offset, logits.stride(0),
            coeff_out.stride(0), targets.stride(0), float(softcap or 0.0), BLOCK_V=_block_v(),
            HAS_SOFTCAP=softcap is not None, LOGITS_CAPPED=logits_capped, num_warps=8,
        )
