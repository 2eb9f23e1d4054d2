// Entry points of the token_logprobs op's C++ backends (bound to Python in bindings.cpp).
// Inputs arrive compacted (no ignored tokens) and validated by autoregembed_fast/ops.py.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace autoregembed_fast {

// hidden [N, d], weight [V, d], bias [V] or none, targets [N] int64 in [0, V).
// Returns {log p [N], log-sum-exp [N], d log p / d hidden [N, d] or undefined, d sum(log p) / d weight
// [V, d] and d sum(log p) / d bias [V] (undefined unless with_head_grads, and a bias for the latter)},
// in float64 for float64 inputs and float32 otherwise. The head's gradients are formed in the same
// sweep (one more GEMM per block): a scalar loss over tokens needs no recompute in its backward.
// softcap <= 0 means no softcap. At most block_rows x V logits live at once. bf16_gemm (bf16 inputs on
// a CPU with AVX512-BF16 only): the GEMMs read the bf16 head and hidden states as they are, with fp32
// products, sums and logits (bf16_gemm_cpu.h); the Jacobian's coefficients round to bf16 for it.
std::vector<at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double softcap, bool with_jacobian, bool with_head_grads,
    int64_t block_rows, bool bf16_gemm);

// Recompute backward for a trainable head: given the forward's log-sum-exp and the per-token upstream
// gradient grad_logp [N] (accumulation dtype), returns {grad hidden, grad weight, grad bias}, each
// undefined unless asked for, in the accumulation dtype.
std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp, double softcap,
    bool need_hidden, bool need_weight, bool need_bias, int64_t block_rows, bool bf16_gemm);

#ifdef AEF_WITH_CUDA
// Epilogue steps of the chunked route on CUDA (logits_epilogue_cuda.cpp / .cu; contracts in
// logits_epilogue_cuda.h). logits [R, Vc] fp32 for vocabulary columns [col_offset, col_offset + Vc);
// every per-row vector is [R] (targets int64, the rest fp32); weights / coeff are [R, Vc] fp32, bf16
// or fp16 and may be logits itself.
void online_softmax_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& targets, int64_t col_offset, double softcap,
    const at::Tensor& running_max, const at::Tensor& running_sumexp, const at::Tensor& target_logit,
    const c10::optional<at::Tensor>& weights, const c10::optional<at::Tensor>& alpha);

void grad_coefficients_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& targets, int64_t col_offset, double softcap,
    const at::Tensor& lse, const at::Tensor& grad, const at::Tensor& coeff);
#endif

}  // namespace autoregembed_fast
