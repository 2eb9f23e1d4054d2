"""Backends of `token_logprobs`: each turns compacted inputs into log-probs, log-sum-exps, Jacobians
and recompute gradients (the contract is in `autoregembed_fast.ops`).

- `CpuBackend`: the C++ driver (`csrc/token_logprobs_cpu.cpp`), chunked GEMM + vectorised epilogue.
- `TritonBackend`: fused Triton kernels (`autoregembed_fast.kernels`); the frozen-head Jacobian and a
  scalar loss's gradients either by the chunked route (cuBLAS GEMMs around the Triton epilogue
  kernels: 2 and 3 GEMM-equivalents) or the fused route (log-sum-exp kernel + recompute kernel: 3
  and 4 GEMM-equivalents, no logits buffer at all).
- `CudaBackend`: the chunked route with the CUDA epilogue kernels of `csrc/logits_epilogue_cuda.cu`,
  for every path.
"""

from __future__ import annotations

import functools
import os

import torch

# Byte budgets for the one block of logits the chunked routes hold at a time. On CPU, 64 MiB was ~5 %
# slower than 128 MiB at the smollm2 shape (smaller blocks starve the GEMM). On GPUs a chunk holds
# fp32 logits plus weights in the input dtype; 48 MiB (+ one [R, d] fp32 GEMM output, 16 MiB at
# R = 1024, d = 4096) keeps the op's extra memory under N*d*4 bytes (the Jacobian) + 64 MB.
CPU_LOGITS_BLOCK_BYTES = 128 * 2**20
# With the bf16 GEMM (see cpu_bf16_gemm) a block also needs its coefficients in bf16 (half as many
# bytes again) and the head is packed twice (2·V·d bf16); the package's GEMM keeps its rate on blocks
# of a few hundred rows, so the block budget is halved to keep the frozen head's memory within 1/8 of
# the materialised path's.
CPU_BF16_LOGITS_BLOCK_BYTES = 64 * 2**20
GPU_LOGITS_BLOCK_BYTES = 48 * 2**20
# Token rows per chunk on GPUs: >= ~300 keeps bf16 GEMMs compute-bound on an H100 (its FLOP/byte
# ridge); 1024 rows leave chunks of 8k columns at V = 128k within the budget.
GPU_MAX_BLOCK_ROWS = 1024
# The one-sweep route for scalar losses holds whole vocabulary rows: 384 MiB of fp32 logits + bf16
# coefficients are 523 rows at V = 128,256, past the ~300 that keep the GEMMs compute-bound (chosen
# by that arithmetic; not yet measured on a GPU).
GPU_SUMMED_BLOCK_BYTES = 384 * 2**20

LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_rows_for_budget(vocab_size: int, bytes_per_logit: int, budget_bytes: int) -> int:
    """Tokens per block so that one block of logits fits the byte budget (at least one token)."""
    return max(1, budget_bytes // (max(vocab_size, 1) * bytes_per_logit))


# bf16 inputs: on CPUs with AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake / Sapphire Rapids+) the CPU
# backend's GEMMs read them as they are, with fp32 products, sums and logits (csrc/bf16_gemm_cpu.h);
# elsewhere bf16 GEMMs are emulated and slow, so the inputs are upcast to fp32 once per call. fp16
# inputs are always upcast (no CPU here has fp16 dot products). This environment variable overrides
# the choice: "0" upcasts everywhere, "1" insists on the bf16 GEMMs (an error without AVX512-BF16).
CPU_BF16_GEMM_ENV = "AUTOREGEMBED_CPU_BF16_GEMM"


def cpu_native_bf16() -> list[str]:
    """The CPU's native bf16 matrix instructions, by their lscpu flag names ("amx_bf16",
    "avx512_bf16"); empty where bf16 GEMMs would be emulated (AVX2-only CPUs: ~160x slower than
    fp32), so bf16 autocast of a whole model is only worth it where this is not empty."""
    extension = CpuBackend.extension()
    return [name for name, present in (("amx_bf16", extension.cpu_has_amx_bf16()),
                                       ("avx512_bf16", extension.cpu_has_avx512_bf16())) if present]


@functools.cache
def cpu_bf16_gemm() -> bool:
    """Whether the CPU backend runs bf16 inputs' GEMMs in bf16 (decided once per process)."""
    native = CpuBackend.extension().cpu_has_avx512_bf16()
    setting = os.environ.get(CPU_BF16_GEMM_ENV, "auto")
    if setting == "auto":
        return native
    if setting == "0":
        return False
    if setting == "1":
        if not native:
            raise RuntimeError(f"{CPU_BF16_GEMM_ENV}=1, but this CPU has no AVX512-BF16 "
                               "(lscpu flag avx512_bf16): its bf16 GEMMs would be emulated")
        return True
    raise ValueError(f'{CPU_BF16_GEMM_ENV} must be "auto", "0" or "1", got {setting!r}')


class CpuBackend:
    """Chunked GEMM + fused epilogue in C++ (`csrc/token_logprobs_cpu.cpp`); bf16 inputs keep their
    dtype in the GEMMs where `cpu_bf16_gemm()`."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    @staticmethod
    def extension():
        from autoregembed_fast import _C

        return _C

    def _block_rows(self, weight: torch.Tensor) -> int:
        bytes_per_logit = torch.empty((), dtype=accumulation_dtype(weight.dtype)).element_size()
        budget = CPU_BF16_LOGITS_BLOCK_BYTES if self._bf16_gemm(weight) else CPU_LOGITS_BLOCK_BYTES
        return block_rows_for_budget(weight.shape[0], bytes_per_logit, budget)

    @staticmethod
    def _bf16_gemm(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16 and cpu_bf16_gemm()

    def _options(self, weight, softcap):
        return self.extension().SweepOptions(softcap=softcap or 0.0,
                                             block_rows=self._block_rows(weight),
                                             bf16_gemm=self._bf16_gemm(weight))

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        C = self.extension()
        logp, lse, jacobian, _, _ = C.token_logprobs_forward_cpu(
            hidden, weight, bias, targets, C.Gradients(hidden=with_jacobian),
            self._options(weight, softcap))
        return logp, lse, jacobian

    def summed_grads(self, hidden, weight, bias, targets, softcap, need_hidden, need_head):
        """One sweep, 3 GEMMs per block: logits, then G @ W and G^T @ H from the coefficients G."""
        C = self.extension()
        gradients = C.Gradients(hidden=need_hidden, weight=need_head,
                                bias=need_head and bias is not None)
        logp, _, grad_hidden, grad_weight, grad_bias = C.token_logprobs_forward_cpu(
            hidden, weight, bias, targets, gradients, self._options(weight, softcap))
        return logp, grad_hidden, grad_weight, grad_bias

    def backward(self, hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                 need_weight, need_bias):
        C = self.extension()
        grads = C.token_logprobs_backward_cpu(
            hidden, weight, bias, targets, lse, grad_logp,
            C.Gradients(hidden=need_hidden, weight=need_weight, bias=need_bias),
            self._options(weight, softcap))
        return tuple(grads)


def summed_grads_by_recompute(backend, hidden, weight, bias, targets, softcap, need_hidden, need_head):
    """Gradients of sum(log p) for backends without a one-sweep route: the log-sum-exp sweep, then
    the recompute backward with a unit upstream gradient (4 GEMM-equivalents, as a trainable head's
    forward + backward costs anyway)."""
    logp, lse, _ = backend.forward(hidden, weight, bias, targets, softcap, False)
    grads = backend.backward(hidden, weight, bias, targets, lse, torch.ones_like(lse), softcap,
                             need_hidden, need_head, need_head and bias is not None)
    return (logp, *grads)


def fp32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: 16-bit operands keep tensor cores on CUDA (fp32 accumulation and
    output via out_dtype); elsewhere (CPU, the Triton interpreter's tests) they are upcast."""
    if a.dtype in LOW_PRECISION and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def blocks(total: int, size: int):
    """Consecutive slices of at most `size` covering range(total)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def chunk_logits(hidden_rows, weight, bias, columns):
    """fp32 logits of a block of token rows against the vocabulary rows `columns` of the head."""
    logits = fp32_gemm(hidden_rows, weight[columns].t())
    if bias is not None:
        logits += bias[columns].float()
    return logits


def weights_buffer(logits, weight):
    """Where an epilogue writes softmax weights or gradient coefficients: 16-bit weights feed the
    next GEMM's tensor cores, so a buffer in their dtype; fp32 ones overwrite the logits."""
    return torch.empty_like(logits, dtype=weight.dtype) if weight.dtype in LOW_PRECISION else logits


class ChunkedRoute:
    """The chunked route on GPU tensors: the work is tiled into (R tokens) x (Vc vocabulary) chunks;
    each chunk's fp32 logits come from one GEMM, an epilogue kernel (Triton or CUDA) turns them into
    softmax weights (forward, online over the vocabulary as in flash attention) or gradient
    coefficients (recompute backward), and a second GEMM with the chunk's rows of W accumulates
    d log p / d hidden (or grad_hidden / grad_weight). Forward + Jacobian is 2 GEMM-equivalents, and
    only one chunk of logits is held at a time, whatever V is, with R large enough to keep the GEMMs
    compute-bound.

    `epilogues` provides `online_softmax_chunk` and `grad_coefficients_chunk` with the contracts of
    `autoregembed_fast.kernels.logits_epilogue`.
    """

    def __init__(self, epilogues):
        self.epilogues = epilogues

    def _tiles(self, n_tokens, weight, with_weights_buffer):
        """(rows, columns) of one chunk: fp32 logits, plus a weights/coefficients buffer in the input
        dtype for 16-bit inputs, within the byte budget."""
        vocab_size = weight.shape[0]
        bytes_per_logit = 4
        if with_weights_buffer and weight.dtype in LOW_PRECISION:
            bytes_per_logit += weight.element_size()
        rows = max(1, min(n_tokens, GPU_MAX_BLOCK_ROWS))
        columns = max(1, min(vocab_size, GPU_LOGITS_BLOCK_BYTES // (rows * bytes_per_logit)))
        return rows, columns

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        # The GEMMs take hidden and weight as any strided views; the CUDA epilogue reads targets by
        # row, so a strided targets vector is copied (N int64s).
        targets = targets.contiguous()
        n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        stats = dict(dtype=torch.float32, device=hidden.device)
        running_max = torch.full((n_tokens,), float("-inf"), **stats)
        running_sumexp = torch.zeros(n_tokens, **stats)
        target_logit = torch.zeros(n_tokens, **stats)
        jacobian = torch.zeros(hidden.shape, **stats) if with_jacobian else None
        rows, columns = self._tiles(n_tokens, weight, with_jacobian)
        for row_block in blocks(n_tokens, rows):
            alpha = torch.empty(row_block.stop - row_block.start, **stats) if with_jacobian else None
            for col_block in blocks(vocab_size, columns):
                logits = chunk_logits(hidden[row_block], weight, bias, col_block)
                weights = weights_buffer(logits, weight) if with_jacobian else None
                self.epilogues.online_softmax_chunk(
                    logits, targets[row_block], col_block.start, softcap, running_max[row_block],
                    running_sumexp[row_block], target_logit[row_block], weights, alpha)
                if with_jacobian:
                    jacobian[row_block].mul_(alpha[:, None]).add_(
                        fp32_gemm(weights, weight[col_block]))
            if with_jacobian:
                # d log p / d hidden = cap'(z_y) (1 - p_y) W[y] - sum_{v != y} p_v cap'(z_v) W[v],
                # with 1 - p_y = -expm1(log p_y) in fp32 (accurate when the softmax is peaked).
                block_target = target_logit[row_block]
                block_lse = running_max[row_block] + torch.log(running_sumexp[row_block])
                slope = torch.ones_like(alpha) if softcap is None else 1 - (block_target / softcap) ** 2
                target_coefficient = slope * -torch.expm1(block_target - block_lse)
                jacobian[row_block] = (target_coefficient[:, None] * weight[targets[row_block]].float()
                                       - jacobian[row_block] / running_sumexp[row_block, None])
        lse = running_max + torch.log(running_sumexp)
        return target_logit - lse, lse, jacobian

    def backward(self, hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                 need_weight, need_bias):
        targets = targets.contiguous()
        stats = dict(dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros(hidden.shape, **stats) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, **stats) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], **stats) if need_bias else None
        n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        rows, columns = self._tiles(n_tokens, weight, True)
        for row_block in blocks(n_tokens, rows):
            for col_block in blocks(vocab_size, columns):
                logits = chunk_logits(hidden[row_block], weight, bias, col_block)
                coeff = weights_buffer(logits, weight)
                self.epilogues.grad_coefficients_chunk(
                    logits, targets[row_block], col_block.start, softcap, lse[row_block],
                    grad_logp[row_block], coeff)
                if need_hidden:
                    grad_hidden[row_block] += fp32_gemm(coeff, weight[col_block])
                if need_weight:
                    grad_weight[col_block] += fp32_gemm(coeff.t(), hidden[row_block])
                if need_bias:
                    grad_bias[col_block] += coeff.float().sum(dim=0)
        return grad_hidden, grad_weight, grad_bias


    def summed_grads(self, hidden, weight, bias, targets, softcap, need_hidden, need_head):
        return summed_grads_by_recompute(self, hidden, weight, bias, targets, softcap, need_hidden,
                                         need_head)


TRITON_ROUTES = ("chunked", "fused")


class TritonBackend:
    """Fused Triton kernels. `route` picks how the frozen-head Jacobian and a scalar loss's gradients
    are formed: "chunked" (cuBLAS GEMMs around the Triton epilogue kernels) or "fused" (the
    log-sum-exp kernel, then the recompute kernel with a unit upstream gradient; no logits buffer)."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, route: str = "chunked"):
        if route not in TRITON_ROUTES:
            raise ValueError(f"route must be one of {TRITON_ROUTES}, got {route!r}")
        self.route = route

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        from autoregembed_fast.kernels import logits_epilogue
        from autoregembed_fast.kernels.logits_backward import logits_backward
        from autoregembed_fast.kernels.lse_forward import lse_forward

        if with_jacobian and self.route == "chunked":
            return ChunkedRoute(logits_epilogue).forward(hidden, weight, bias, targets, softcap, True)
        lse, target_logit = lse_forward(hidden, weight, bias, targets, softcap)
        jacobian = None
        if with_jacobian:
            jacobian, _, _ = logits_backward(hidden, weight, bias, targets, lse, None, softcap,
                                             True, False, False)
        return target_logit - lse, lse, jacobian

    def backward(self, hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                 need_weight, need_bias):
        from autoregembed_fast.kernels.logits_backward import logits_backward

        return logits_backward(hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                               need_weight, need_bias)

    def summed_grads(self, hidden, weight, bias, targets, softcap, need_hidden, need_head):
        if self.route == "fused":
            return summed_grads_by_recompute(self, hidden, weight, bias, targets, softcap,
                                             need_hidden, need_head)
        return self._summed_grads_in_one_sweep(hidden, weight, bias, targets, softcap, need_hidden,
                                               need_head)

    def _summed_grads_in_one_sweep(self, hidden, weight, bias, targets, softcap, need_hidden,
                                   need_head):
        """3 GEMM-equivalents, as the CPU backend and Liger's fused linear cross-entropy: blocks of
        token rows holding their whole vocabulary rows; per block the fp32 logits (cuBLAS), their
        log-sum-exp (`online_softmax_chunk` over the one chunk, so it is final), the gradient
        coefficients written over them (`grad_coefficients_chunk`), then G @ W and G^T @ H."""
        from autoregembed_fast.kernels import logits_epilogue

        targets = targets.contiguous()
        n_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        stats = dict(dtype=torch.float32, device=hidden.device)
        logp = torch.empty(n_tokens, **stats)
        grad_hidden = torch.empty(hidden.shape, **stats) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, **stats) if need_head else None
        grad_bias = torch.zeros(vocab_size, **stats) if need_head and bias is not None else None
        bytes_per_logit = 4 + (weight.element_size() if weight.dtype in LOW_PRECISION else 0)
        rows = min(GPU_MAX_BLOCK_ROWS,
                   block_rows_for_budget(vocab_size, bytes_per_logit, GPU_SUMMED_BLOCK_BYTES))
        every_column = slice(None)
        for block in blocks(n_tokens, rows):
            block_rows = block.stop - block.start
            logits = chunk_logits(hidden[block], weight, bias, every_column)
            running_max = torch.full((block_rows,), float("-inf"), **stats)
            running_sumexp = torch.zeros(block_rows, **stats)
            target_logit = torch.zeros(block_rows, **stats)
            logits_epilogue.online_softmax_chunk(logits, targets[block], 0, softcap, running_max,
                                                 running_sumexp, target_logit)
            lse = running_max + torch.log(running_sumexp)
            logp[block] = target_logit - lse
            coeff = weights_buffer(logits, weight)
            logits_epilogue.grad_coefficients_chunk(logits, targets[block], 0, softcap, lse,
                                                    torch.ones_like(lse), coeff, logits_capped=True)
            if need_hidden:
                grad_hidden[block] = fp32_gemm(coeff, weight)
            if need_head:
                grad_weight += fp32_gemm(coeff.t(), hidden[block])
            if grad_bias is not None:
                grad_bias += coeff.float().sum(dim=0)
        return logp, grad_hidden, grad_weight, grad_bias


def cuda_extension_available() -> bool:
    from autoregembed_fast import _C

    return hasattr(_C, "online_softmax_chunk_cuda")


class CudaEpilogues:
    """The CUDA epilogue kernels (csrc/logits_epilogue_cuda.cu), same contracts as the Triton ones in
    `autoregembed_fast.kernels.logits_epilogue`."""

    @staticmethod
    def online_softmax_chunk(logits, targets, col_offset, softcap, running_max, running_sumexp,
                             target_logit, weights_out=None, alpha_out=None):
        from autoregembed_fast import _C

        _C.online_softmax_chunk_cuda(logits, targets, col_offset, float(softcap or 0.0), running_max,
                                     running_sumexp, target_logit, weights_out, alpha_out)

    @staticmethod
    def grad_coefficients_chunk(logits, targets, col_offset, softcap, lse, grad_logp, coeff_out):
        from autoregembed_fast import _C

        _C.grad_coefficients_chunk_cuda(logits, targets, col_offset, float(softcap or 0.0), lse,
                                        grad_logp, coeff_out)


class CudaBackend(ChunkedRoute):
    """cuBLAS GEMMs on token blocks around the CUDA epilogue kernel, for every path."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self):
        super().__init__(CudaEpilogues)
