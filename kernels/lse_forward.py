"""Fused log-sum-exp + target-logit forward: logits tiles live in registers only.

Programs tile the tokens (BLOCK_N) and split the vocabulary into `num_splits` ranges; each streams over
its range in BLOCK_V tiles (logits = hidden @ weight^T accumulated over D in BLOCK_D steps), keeping an
online max / sum-exp per token and picking up the target's logit when its tile passes by. The launcher
merges the per-split partials (a [num_splits, N] log-sum-exp) in torch. This is the whole forward under
no_grad and the forward of the trainable-head path.

Program order: the token blocks of one split are consecutive programs, so the programs running at
the same time read the same weight tiles (which stay in L2), and each program reads its hidden rows
once per vocabulary tile from L2/L1.
"""

import torch
import triton
import triton.language as tl

from autoregembed_fast.kernels import on_device, operand_kind, token_bucket
from autoregembed_fast.kernels.autotuning import tuned_by_operand_kind
from autoregembed_fast.kernels.tl_utils import (
    INTERPRETING, apply_softcap, logits_tile, tile_indices,
)


@triton.jit(do_not_specialize=["n_bucket"])
def _lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, split_max_ptr, split_sumexp_ptr,
    split_target_ptr, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_t,
    softcap, num_splits, n_bucket,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    # n_bucket is unused by the body: it is part of the autotuning key (see `token_bucket`).
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tile_indices(pid_n, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows * stride_t, mask=row_mask, other=-1)

    vocab_per_split = tl.cdiv(tl.cdiv(V, num_splits), BLOCK_V) * BLOCK_V
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sumexp = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < v_end
        logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                             stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                             BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST)
        logits = apply_softcap(logits, softcap, HAS_SOFTCAP)
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sumexp = running_sumexp * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)

    out = split.to(tl.int64) * N + rows
    tl.store(split_max_ptr + out, running_max, mask=row_mask)
    tl.store(split_sumexp_ptr + out, running_sumexp, mask=row_mask)
    tl.store(split_target_ptr + out, target_logit, mask=row_mask)


# Hopper and Ampere tiles for 16-bit operands: 128x128 logits tiles with 64-wide D steps keep the
# tensor cores fed at d = 576..4096; the smaller tile helps small N. fp32 operands (exact fp32 dots,
# no tensor cores) keep their accumulators and operands in registers, so their tiles are smaller.
# Every config is compiled for sm_90 in CI, where a config that spills registers fails
# (tests/test_kernels.py); on sm_80 the 128x256 tile spills (~76 bytes) and is left to the autotuner.
GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
]
GPU_CONFIGS_FP32 = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
]
# Large tiles under the interpreter: its cost grows with the number of tile steps, not their size.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32})]
# One autotuner per operand kind ("16-bit" or "fp32"), each over its own configs.
TUNED = tuned_by_operand_kind(_lse_forward_kernel, GPU_CONFIGS_16BIT, GPU_CONFIGS_FP32,
                              INTERPRETER_CONFIGS)


def default_num_splits(n_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Enough vocabulary splits that the grid covers every SM about twice when N alone would not."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(n_tokens, 128)
    return max(1, min(triton.cdiv(2 * sms, token_blocks), triton.cdiv(vocab_size, 256)))


def lse_forward(hidden, weight, bias, targets, softcap, num_splits=None):
    """log-sum-exp [N] and target logit [N] (fp32) of softcap(hidden @ weight^T + bias).

    hidden [N, d], weight [V, d], bias [V] | None and targets [N] (int64 in [0, V)) may be any
    strided views on one device.
    """
    n_tokens, dim = hidden.shape
    vocab_size = weight.shape[0]
    if n_tokens == 0:  # no grid to launch
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    if num_splits is None:
        num_splits = default_num_splits(n_tokens, vocab_size, hidden.device)
    partial = torch.empty((3, num_splits, n_tokens), dtype=torch.float32, device=hidden.device)
    args = (
        hidden, weight, bias, targets, partial[0], partial[1], partial[2], n_tokens, vocab_size, dim,
        *hidden.stride(), *weight.stride(), 0 if bias is None else bias.stride(0), targets.stride(0),
        float(softcap or 0.0), num_splits, token_bucket(n_tokens),
    )
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), num_splits)  # noqa: E731
    with on_device(hidden):
        TUNED[operand_kind(hidden.dtype)][grid](
            *args, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=INTERPRETING)
    split_max, split_sumexp, split_target = partial
    overall_max = split_max.max(dim=0).values
    lse = overall_max + torch.log((split_sumexp * torch.exp(split_max - overall_max)).sum(dim=0))
    return lse, split_target.sum(dim=0)
