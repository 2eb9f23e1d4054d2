// Launcher of the CUDA epilogue kernel of the chunked route (logits_epilogue_cuda.cu). No torch
// headers: raw pointers, sizes and a stream; the torch glue is logits_epilogue_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace autoregembed_fast {

enum class CoeffType : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Over a block of fp32 logits [rows, vocab] (row stride logits_stride, unit column stride), one CUDA
// block per row:
// - compute_lse: caps the logits in place (softcap > 0), writes lse[row] and target_logit[row];
//   otherwise lse[row] is read and the logits are raw (capped on the fly).
// - coeff != nullptr: writes scale * (onehot(target) - softmax) * cap' into coeff (row stride
//   coeff_stride, element type coeff_type; may alias logits when fp32), scale = grad[row] or 1 when
//   grad == nullptr.
// targets must lie in [0, vocab). Returns the launch's error code.
cudaError_t launch_logits_epilogue(
    float* logits, int64_t rows, int64_t vocab, int64_t logits_stride, void* coeff,
    CoeffType coeff_type, int64_t coeff_stride, const int64_t* targets, float* lse,
    float* target_logit, const float* grad, float softcap, bool compute_lse, cudaStream_t stream);

}  // namespace autoregembed_fast
