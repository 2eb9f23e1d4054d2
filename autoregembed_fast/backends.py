"""Backends of `token_logprobs`: each turns compacted inputs into log-probs, log-sum-exps, Jacobians
and recompute gradients (the contract is in `autoregembed_fast.ops`).

- `CpuBackend`: the C++ driver (`csrc/token_logprobs_cpu.cpp`), chunked GEMM + vectorised epilogue.
- `TritonBackend`: fused Triton kernels (`autoregembed_fast.kernels`); the frozen-head Jacobian either
  by the chunked route (cuBLAS GEMMs around the Triton epilogue kernel, 2 GEMM-equivalents) or the
  fused route (log-sum-exp kernel + recompute kernel, 3 GEMM-equivalents, no logits buffer at all).
- `CudaBackend`: the chunked route with the CUDA epilogue kernel of `csrc/logits_epilogue_cuda.cu`.
"""

from __future__ import annotations

import torch

# Byte budgets for the one block of logits the chunked routes hold at a time. On CPU, 64 MiB was ~5 %
# slower than 128 MiB at the smollm2 shape (smaller blocks starve the GEMM). On GPUs the block holds
# fp32 logits plus coefficients in the input dtype; 48 MiB keeps the op's extra memory under
# N*d*4 bytes (the Jacobian) + 64 MB.
CPU_LOGITS_BLOCK_BYTES = 128 * 2**20
GPU_LOGITS_BLOCK_BYTES = 48 * 2**20

LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate in float64, every other float dtype in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_rows_for_budget(vocab_size: int, bytes_per_logit: int, budget_bytes: int) -> int:
    """Tokens per block so that one block of logits fits the byte budget (at least one token)."""
    return max(1, budget_bytes // (max(vocab_size, 1) * bytes_per_logit))


class CpuBackend:
    """Chunked GEMM + fused epilogue in C++ (`csrc/token_logprobs_cpu.cpp`)."""

    name = "cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def __init__(self, block_bytes: int | None = None):
        self.block_bytes = CPU_LOGITS_BLOCK_BYTES if block_bytes is None else block_bytes

    @staticmethod
    def extension():
        from autoregembed_fast import _C

        return _C

    def _block_rows(self, weight: torch.Tensor) -> int:
        bytes_per_logit = torch.empty((), dtype=accumulation_dtype(weight.dtype)).element_size()
        return block_rows_for_budget(weight.shape[0], bytes_per_logit, self.block_bytes)

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        logp, lse, jacobian = self.extension().token_logprobs_forward_cpu(
            hidden, weight, bias, targets, softcap or 0.0, with_jacobian, self._block_rows(weight)
        )
        return logp, lse, jacobian

    def backward(self, hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                 need_weight, need_bias):
        grads = self.extension().token_logprobs_backward_cpu(
            hidden, weight, bias, targets, lse, grad_logp, softcap or 0.0,
            need_hidden, need_weight, need_bias, self._block_rows(weight),
        )
        return tuple(grads)


def fp32_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: 16-bit operands keep tensor cores on CUDA (fp32 accumulation and
    output via out_dtype); elsewhere (CPU, the Triton interpreter's tests) they are upcast."""
    if a.dtype in LOW_PRECISION and a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class ChunkedRoute:
    """The chunked route on GPU tensors: per block of C tokens, fp32 logits from one GEMM, an epilogue
    kernel (Triton or CUDA) that yields the log-sum-exp and the gradient coefficients G, then G @ W.
    `epilogue(logits, targets, softcap, lse=, coeff_out=, grad_logp=) -> (lse, target_logit)` is the
    contract of `autoregembed_fast.kernels.logits_epilogue.logits_epilogue`."""

    def __init__(self, epilogue, block_bytes: int | None = None):
        self.epilogue = epilogue
        self.block_bytes = GPU_LOGITS_BLOCK_BYTES if block_bytes is None else block_bytes

    def _blocks(self, hidden, weight):
        # fp32 logits, plus a separate coefficient buffer in the input dtype for 16-bit inputs.
        bytes_per_logit = 4 + (weight.element_size() if weight.dtype in LOW_PRECISION else 0)
        rows = block_rows_for_budget(weight.shape[0], bytes_per_logit, self.block_bytes)
        for start in range(0, hidden.shape[0], rows):
            yield slice(start, min(start + rows, hidden.shape[0]))

    @staticmethod
    def _logits(hidden_block, weight, bias):
        logits = fp32_gemm(hidden_block, weight.t())
        if bias is not None:
            logits += bias.float()
        return logits

    @staticmethod
    def _coefficient_buffer(logits, weight):
        # 16-bit coefficients feed the second GEMM's tensor cores; fp32 ones overwrite the logits.
        return torch.empty_like(logits, dtype=weight.dtype) if weight.dtype in LOW_PRECISION else logits

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        n_tokens = hidden.shape[0]
        lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        logp = torch.empty_like(lse)
        jacobian = (torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
                    if with_jacobian else None)
        for block in self._blocks(hidden, weight):
            logits = self._logits(hidden[block], weight, bias)
            coeff = self._coefficient_buffer(logits, weight) if with_jacobian else None
            block_lse, target_logit = self.epilogue(logits, targets[block], softcap, coeff_out=coeff)
            lse[block] = block_lse
            logp[block] = target_logit - block_lse
            if with_jacobian:
                jacobian[block] = fp32_gemm(coeff, weight)
        return logp, lse, jacobian

    def backward(self, hidden, weight, bias, targets, lse, grad_logp, softcap, need_hidden,
                 need_weight, need_bias):
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if need_bias else None
        for block in self._blocks(hidden, weight):
            logits = self._logits(hidden[block], weight, bias)
            coeff = self._coefficient_buffer(logits, weight)
            self.epilogue(logits, targets[block], softcap, lse=lse[block], coeff_out=coeff,
                          grad_logp=grad_logp[block])
            if need_hidden:
                grad_hidden[block] = fp32_gemm(coeff, weight)
            if need_weight:
                grad_weight += fp32_gemm(coeff.t(), hidden[block])
            if need_bias:
                grad_bias += coeff.float().sum(dim=0)
        return grad_hidden, grad_weight, grad_bias


JACOBIAN_ROUTES = ("chunked", "fused")


class TritonBackend:
    """Fused Triton kernels. `jacobian` picks the frozen-head route: "chunked" (GEMM + Triton epilogue
    + GEMM) or "fused" (log-sum-exp kernel, then the recompute kernel with unit upstream gradient)."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, jacobian: str = "chunked"):
        if jacobian not in JACOBIAN_ROUTES:
            raise ValueError(f"jacobian must be one of {JACOBIAN_ROUTES}, got {jacobian!r}")
        self.jacobian = jacobian

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        from autoregembed_fast.kernels.logits_backward import logits_backward
        from autoregembed_fast.kernels.logits_epilogue import logits_epilogue
        from autoregembed_fast.kernels.lse_forward import lse_forward

        if with_jacobian and self.jacobian == "chunked":
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


def cuda_extension_available() -> bool:
    from autoregembed_fast import _C

    return hasattr(_C, "logits_epilogue_cuda")


def cuda_logits_epilogue(logits, targets, softcap, *, lse=None, coeff_out=None, grad_logp=None):
    """The CUDA epilogue kernel (csrc/logits_epilogue_cuda.cu), same contract as the Triton one."""
    from autoregembed_fast import _C

    compute_lse = lse is None
    rows = logits.shape[0]
    if compute_lse:
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        target_logit = torch.empty(rows, dtype=torch.float32, device=logits.device)
    else:
        target_logit = None
    _C.logits_epilogue_cuda(logits, coeff_out, targets, lse, target_logit, grad_logp,
                            float(softcap or 0.0), compute_lse)
    return lse, target_logit


class CudaBackend(ChunkedRoute):
    """cuBLAS GEMMs on token blocks around the CUDA epilogue kernel, for every path."""

    name = "cuda"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self, block_bytes: int | None = None):
        super().__init__(cuda_logits_epilogue, block_bytes)
