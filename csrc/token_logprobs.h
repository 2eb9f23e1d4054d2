// Entry points of the token_logprobs op's C++ backends (bound to Python in bindings.cpp).
// Inputs arrive compacted (no ignored tokens) and validated by autoregembed_fast/ops.py.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace autoregembed_fast {

// hidden [N, d], weight [V, d], bias [V] or none, targets [N] int64 in [0, V).
// Returns {log p [N], log-sum-exp [N], d log p / d hidden [N, d] or undefined}, in float64 for float64
// inputs and float32 otherwise. softcap <= 0 means no softcap. At most block_rows x V logits live at once.
std::vector<at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double softcap, bool with_jacobian, int64_t block_rows);

// Recompute backward for a trainable head: given the forward's log-sum-exp and the per-token upstream
// gradient grad_logp [N] (accumulation dtype), returns {grad hidden, grad weight, grad bias}, each
// undefined unless asked for, in the accumulation dtype.
std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp, double softcap,
    bool need_hidden, bool need_weight, bool need_bias, int64_t block_rows);

#ifdef AEF_WITH_CUDA
// Epilogue of the chunked route on CUDA (logits_epilogue_cuda.cu; contract in logits_epilogue_cuda.h):
// logits [C, V] fp32, coeff [C, V] fp32/bf16/fp16 or none, targets [C] int64, lse [C] fp32 (written
// when compute_lse, read otherwise), target_logit [C] fp32 (written when compute_lse), grad [C] fp32.
void logits_epilogue_cuda(
    const at::Tensor& logits, const c10::optional<at::Tensor>& coeff, const at::Tensor& targets,
    const at::Tensor& lse, const c10::optional<at::Tensor>& target_logit,
    const c10::optional<at::Tensor>& grad, double softcap, bool compute_lse);
#endif

}  // namespace autoregembed_fast
