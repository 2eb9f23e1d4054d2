// Launchers of the CUDA epilogue kernels of the chunked route (logits_epilogue_cuda.cu). No torch
// headers: raw pointers, sizes and a stream; the torch glue is logits_epilogue_cuda.cpp. Contracts as
// in kernels/logits_epilogue.py (the Triton twins, tested on CPU under the interpreter).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace autoregembed_fast {

enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Forward step over one chunk of fp32 logits [rows, chunk] (row stride logits_stride, unit column
// stride) holding vocabulary columns [col_offset, col_offset + chunk), one CUDA block per row: caps
// the logits in place (softcap > 0), updates running_max / running_sumexp / target_logit [rows], and,
// when weights != nullptr, writes weights = exp(z - new_max) * cap'(z), 0 at the target's column
// (row stride weights_stride,
// element type weights_type; may alias logits when fp32) and alpha [rows] = exp(old_max - new_max).
cudaError_t launch_online_softmax_chunk(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* weights, FloatType weights_type, int64_t weights_stride, float* alpha,
    const int64_t* targets, float* running_max, float* running_sumexp, float* target_logit,
    float softcap, cudaStream_t stream);

// Recompute-backward step over raw fp32 logits of the same layout: writes
// grad[row] * (onehot(target) - exp(cap(z) - lse[row])) * cap'(z) into coeff (may alias logits).
cudaError_t launch_grad_coefficients_chunk(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* coeff, FloatType coeff_type, int64_t coeff_stride, const int64_t* targets,
    const float* lse, const float* grad, float softcap, cudaStream_t stream);

}  // namespace autoregembed_fast
