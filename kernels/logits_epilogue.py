"""Fused epilogue over a block of logits already in memory (the chunked route's second step).

The chunked route computes a block of logits Z = H_c W^T with the platform GEMM (cuBLAS), runs this
kernel over it, then forms G @ W with a second GEMM: 2 GEMM-equivalents for forward + Jacobian. One
program per token row streams over its V logits:

- with COMPUTE_LSE: applies the softcap (writing the capped logits back), keeps an online max /
  sum-exp and picks up the target's logit -> lse, target_logit;
- with WRITE_COEFF: writes G = g * (onehot(target) - softmax) * softcap' for the row (g = 1 without
  an upstream gradient), into the logits buffer itself or into a separate (e.g. bf16) buffer.

Without COMPUTE_LSE the row's log-sum-exp is read from `lse_ptr` and the logits are raw (the recompute
backward), so the softcap is applied on the fly.
"""

import torch
import triton
import triton.language as tl

from autoregembed_fast.kernels.tl_utils import INTERPRETING, apply_softcap, softcap_slope


@triton.jit
def _logits_epilogue_kernel(
    logits_ptr, coeff_ptr, targets_ptr, lse_ptr, target_logit_ptr, grad_ptr,
    V, stride_logits, stride_coeff, softcap,
    BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    WRITE_COEFF: tl.constexpr, HAS_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + row)

    if COMPUTE_LSE:
        running_max = float("-inf")
        running_sumexp = 0.0
        target_logit = 0.0
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = tl.load(logits_row + cols, mask=col_mask, other=0.0)
            if HAS_SOFTCAP:
                z = apply_softcap(z, softcap, HAS_SOFTCAP)
                tl.store(logits_row + cols, z, mask=col_mask)
            z = tl.where(col_mask, z, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sumexp = running_sumexp * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(z - new_max), axis=0)
            running_max = new_max
            target_logit += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
        lse = running_max + tl.log(running_sumexp)
        tl.store(lse_ptr + row, lse)
        tl.store(target_logit_ptr + row, target_logit)
    else:
        lse = tl.load(lse_ptr + row)

    if WRITE_COEFF:
        if HAS_GRAD:
            grad = tl.load(grad_ptr + row)
        else:
            grad = 1.0
        coeff_row = coeff_ptr + row * stride_coeff
        for v_start in range(0, V, BLOCK_V):
            cols = v_start + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z = tl.load(logits_row + cols, mask=col_mask, other=0.0)
            if not COMPUTE_LSE:
                z = apply_softcap(z, softcap, HAS_SOFTCAP)
            onehot = tl.where(cols == target, 1.0, 0.0)
            coeff = grad * (onehot - tl.exp(z - lse)) * softcap_slope(z, softcap, HAS_SOFTCAP)
            tl.store(coeff_row + cols, coeff, mask=col_mask)


GPU_BLOCK_V = 2048
INTERPRETER_BLOCK_V = 256


def logits_epilogue(logits, targets, softcap, *, lse=None, coeff_out=None, grad_logp=None):
    """Runs the epilogue over logits [C, V] fp32 (rows contiguous); returns (lse [C], target_logit [C]).

    lse=None computes the log-sum-exp (and caps `logits` in place when softcap is set); otherwise the
    given lse is used and `logits` must be raw. coeff_out [C, V] (may be `logits` itself) receives the
    gradient coefficients, scaled per row by grad_logp [C] (1 when None).
    """
    rows, vocab_size = logits.shape
    compute_lse = lse is None
    if compute_lse:
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(rows, dtype=torch.float32, device=logits.device)
    else:
        target_logit = None
    if rows == 0:
        return lse, target_logit
    coeff = logits if coeff_out is None else coeff_out
    _logits_epilogue_kernel[(rows,)](
        logits, coeff, targets, lse, target_logit, grad_logp,
        vocab_size, logits.stride(0), coeff.stride(0), float(softcap or 0.0),
        BLOCK_V=INTERPRETER_BLOCK_V if INTERPRETING else GPU_BLOCK_V,
        HAS_SOFTCAP=softcap is not None, COMPUTE_LSE=compute_lse,
        WRITE_COEFF=coeff_out is not None, HAS_GRAD=grad_logp is not None,
        num_warps=8,
    )
    return lse, target_logit
