"""Device helpers shared by the Triton kernels, and the switches that depend on how they run."""

import triton
import triton.language as tl

from autoregembed_fast.kernels import INTERPRETING  # noqa: F401  (re-exported for the kernels)


@triton.jit
def tanh(x):
    # Through exp, not libdevice (libdevice fails under the interpreter); saturates to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def apply_softcap(logits, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        logits = softcap * tanh(logits / softcap)
    return logits


@triton.jit
def softcap_slope(capped_logits, softcap, HAS_SOFTCAP: tl.constexpr):
    """d cap(z) / dz expressed through the capped value: 1 - (cap(z) / c)^2 (1 without a softcap)."""
    if HAS_SOFTCAP:
        ratio = capped_logits / softcap
        return 1.0 - ratio * ratio
    return tl.full(capped_logits.shape, 1.0, tl.float32)


@triton.jit
def tile_indices(block, BLOCK: tl.constexpr):
    """Indices of tile `block` as int64, so that index * stride cannot overflow 32 bits when N * d or
    V * d passes 2^31 (a 128k-vocabulary head at d = 16k, or a strided view of a larger buffer)."""
    return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP row tiles at a time sweeping the column tiles
    (the Triton matmul tutorial's order): the programs running together share GROUP row tiles and a
    few column tiles, so re-read operand tiles stay in L2."""
    tiles_per_group = GROUP * num_col_tiles
    group = pid // tiles_per_group
    first_row = group * GROUP
    rows_in_group = tl.minimum(num_row_tiles - first_row, GROUP)
    within = pid % tiles_per_group
    return first_row + within % rows_in_group, within // rows_in_group


@triton.jit
def logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
                stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile hidden[rows] @ weight[cols]^T (+ bias[cols]), accumulated over D in BLOCK_D steps.
    rows / cols are int64 indices; hidden [N, d], weight [V, d] and bias [V] may have any strides
    (a unit stride is specialised by the compiler, so contiguous inputs keep vectorised loads)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + dims[None, :] * stride_hd,
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + dims[None, :] * stride_wd,
                    mask=col_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # "ieee": float32 inputs get true fp32 products, not TF32 (ignored for 16-bit operands).
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_b, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc
