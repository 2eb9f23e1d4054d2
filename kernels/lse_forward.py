"""Fused log-sum-exp + target-logit forward: logits tiles live in registers only.

Programs tile the tokens (BLOCK_N) and split the vocabulary into `num_splits` ranges; each streams over
its range in BLOCK_V tiles (logits = hidden @ weight^T accumulated over D in BLOCK_D steps), keeping an
online max / sum-exp per token and picking up the target's logit when its tile passes by. The launcher
merges the per-split partials (a [num_splits, N] log-sum-exp) in torch. This is the whole forward under
no_grad and the forward of the trainable-head path.
"""

import torch
import triton
import triton.language as tl

from autoregembed_fast.kernels.tl_utils import INTERPRETING, apply_softcap, logits_tile


@triton.jit
def _lse_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, split_max_ptr, split_sumexp_ptr,
    split_target_ptr, N, V, D, stride_h, stride_w, softcap, num_splits,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    vocab_per_split = tl.cdiv(tl.cdiv(V, num_splits), BLOCK_V) * BLOCK_V
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, V)

    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sumexp = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logits = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                             stride_h, stride_w, BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, UPCAST)
        logits = apply_softcap(logits, softcap, HAS_SOFTCAP)
        logits = tl.where(col_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sumexp = running_sumexp * tl.exp(running_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)

    out = split * N + rows
    tl.store(split_max_ptr + out, running_max, mask=row_mask)
    tl.store(split_sumexp_ptr + out, running_sumexp, mask=row_mask)
    tl.store(split_target_ptr + out, target_logit, mask=row_mask)


# Hopper and Ampere tiles: 128x128 logits tiles with 64-wide D steps keep the tensor cores fed at
# d = 576..4096; the smaller tile helps small N. Keyed on D and V, the shape that changes the balance.
GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4),
]
# Large tiles under the interpreter: its cost grows with the number of tile steps, not their size.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}

_lse_forward_tuned = triton.autotune(configs=GPU_CONFIGS, key=["D", "V"])(_lse_forward_kernel)


def default_num_splits(n_tokens: int, vocab_size: int, device: torch.device) -> int:
    """Enough vocabulary splits that the grid covers every SM about twice when N alone would not."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(n_tokens, 128)
    return max(1, min(triton.cdiv(2 * sms, token_blocks), triton.cdiv(vocab_size, 256)))


def lse_forward(hidden, weight, bias, targets, softcap, num_splits=None):
    """log-sum-exp [N] and target logit [N] (fp32) of softcap(hidden @ weight^T + bias).

    hidden [N, d] and weight [V, d] contiguous in the last dim; targets [N] int64 in [0, V).
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
        hidden.stride(0), weight.stride(0), float(softcap or 0.0), num_splits,
    )
    flags = {"HAS_BIAS": bias is not None, "HAS_SOFTCAP": softcap is not None,
             "UPCAST": INTERPRETING}
    if INTERPRETING:
        grid = (triton.cdiv(n_tokens, INTERPRETER_CONFIG["BLOCK_N"]), num_splits)
        _lse_forward_kernel[grid](*args, **INTERPRETER_CONFIG, **flags)
    else:
        grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), num_splits)  # noqa: E731
        _lse_forward_tuned[grid](*args, **flags)
    split_max, split_sumexp, split_target = partial
    overall_max = split_max.max(dim=0).values
    lse = overall_max + torch.log((split_sumexp * torch.exp(split_max - overall_max)).sum(dim=0))
    return lse, split_target.sum(dim=0)
