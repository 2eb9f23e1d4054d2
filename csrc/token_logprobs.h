// Entry points of the token_logprobs op's C++ backends (bound to Python in bindings.cpp).
// Inputs arrive compacted (no ignored tokens) and validated by autoregembed_fast/ops.py.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace autoregembed_fast {

// Which gradients a call forms; each is returned undefined unless asked for.
struct Gradients {
  bool hidden = false;  // forward: d log p / d hidden [N, d] (the Jacobian); backward: grad hidden
  bool weight = false;  // [V, d]
  bool bias = false;    // [V]; needs a bias
  bool any() const { return hidden || weight || bias; }
};

// How a call sweeps the vocabulary.
struct SweepOptions {
  double softcap = 0.0;    // <= 0: no softcap
  int64_t block_rows = 1;  // at most block_rows x V logits live at once
  // bf16 inputs on a CPU with AVX512-BF16 only: the GEMMs read the bf16 head and hidden states as
  // they are, with fp32 products, sums and logits (bf16_gemm_cpu.h); the gradient coefficients G are
  // rounded to bf16 for them.
  bool bf16_gemm = false;
};

// hidden [N, d], weight [V, d], bias [V] or none, targets [N] int64 in [0, V).
// Returns {log p [N], log-sum-exp [N], then the gradients asked for: d log p / d hidden [N, d],
// d sum(log p) / d weight [V, d], d sum(log p) / d bias [V]}, in float64 for float64 inputs and
// float32 otherwise. The head's gradients are formed in the same sweep (one more GEMM per block): a
// scalar loss over tokens needs no recompute in its backward.
std::vector<at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const Gradients& gradients, const SweepOptions& options);

// Recompute backward for a trainable head: given the forward's log-sum-exp and the per-token upstream
// gradient grad_logp [N] (accumulation dtype), returns {grad hidden, grad weight, grad bias}, each
// undefined unless asked for, in the accumulation dtype.
std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp,
    const Gradients& gradients, const SweepOptions& options);

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
