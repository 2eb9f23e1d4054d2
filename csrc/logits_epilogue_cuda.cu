// CUDA epilogue kernel of the chunked route: one block of threads per token row streams over the
// row's V logits (already produced by a cuBLAS GEMM) for the log-sum-exp and target logit, then writes
// the gradient coefficients that a second GEMM turns into d log p / d hidden. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math_constants.h>

#include "epilogue_math.h"
#include "logits_epilogue_cuda.h"

namespace autoregembed_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct MaxSumExp {
  float max;
  float sumexp;  // sum of exp(z - max)
};

__device__ __forceinline__ MaxSumExp merge(MaxSumExp a, MaxSumExp b) {
  // An empty side (max = -inf, sum 0) is skipped: exp(-inf - -inf) would turn the merge into NaN.
  // A NaN side keeps a NaN sum, so non-finite logits still surface in the log-sum-exp.
  if (a.max == -CUDART_INF_F) return b;
  if (b.max == -CUDART_INF_F) return a;
  const float max = fmaxf(a.max, b.max);
  return {max, a.sumexp * expf(a.max - max) + b.sumexp * expf(b.max - max)};
}

__device__ __forceinline__ float apply_softcap(float z, float softcap) {
  return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

// Block-wide merge of every thread's (max, sumexp); the result is returned to all threads.
__device__ MaxSumExp block_merge(MaxSumExp state) {
  __shared__ MaxSumExp per_warp[kWarps];
  __shared__ MaxSumExp result;
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSumExp other{__shfl_down_sync(0xffffffffu, state.max, offset),
                    __shfl_down_sync(0xffffffffu, state.sumexp, offset)};
    state = merge(state, other);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) per_warp[warp] = state;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSumExp total = per_warp[0];
    for (int w = 1; w < kWarps; ++w) total = merge(total, per_warp[w]);
    result = total;
  }
  __syncthreads();
  return result;
}

template <typename coeff_t>
__global__ void __launch_bounds__(kThreads) logits_epilogue_kernel(
    float* logits, int64_t vocab, int64_t logits_stride, coeff_t* coeff, int64_t coeff_stride,
    const int64_t* targets, float* lse_out, float* target_logit_out, const float* grad,
    float softcap, bool compute_lse) {
  const int64_t row = blockIdx.x;
  float* z = logits + row * logits_stride;
  const int64_t target = targets[row];

  float lse;
  if (compute_lse) {
    MaxSumExp state{-CUDART_INF_F, 0.f};
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      float x = z[v];
      if (softcap > 0.f) {
        x = apply_softcap(x, softcap);
        z[v] = x;
      }
      if (x > state.max) {
        state.sumexp = state.sumexp * expf(state.max - x) + 1.f;
        state.max = x;
      } else {
        state.sumexp += expf(x - state.max);
      }
    }
    const MaxSumExp total = block_merge(state);  // its __syncthreads also publishes the capped z
    lse = total.max + logf(total.sumexp);
    if (threadIdx.x == 0) {
      lse_out[row] = lse;
      target_logit_out[row] = z[target];
    }
  } else {
    lse = lse_out[row];
  }

  if (coeff == nullptr) return;
  const float scale = grad != nullptr ? grad[row] : 1.f;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  coeff_t* out = coeff + row * coeff_stride;
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
    const float x = compute_lse ? z[v] : apply_softcap(z[v], softcap);
    const float slope = softcap > 0.f ? softcap_slope(x, inv_cap) : 1.f;
    out[v] = from_float<coeff_t>(grad_coefficient(expf(x - lse), slope, v == target, scale));
  }
}

template <typename coeff_t>
cudaError_t launch_typed(
    float* logits, int64_t rows, int64_t vocab, int64_t logits_stride, void* coeff,
    int64_t coeff_stride, const int64_t* targets, float* lse, float* target_logit,
    const float* grad, float softcap, bool compute_lse, cudaStream_t stream) {
  logits_epilogue_kernel<coeff_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, vocab, logits_stride, static_cast<coeff_t*>(coeff), coeff_stride, targets, lse,
      target_logit, grad, softcap, compute_lse);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_logits_epilogue(
    float* logits, int64_t rows, int64_t vocab, int64_t logits_stride, void* coeff,
    CoeffType coeff_type, int64_t coeff_stride, const int64_t* targets, float* lse,
    float* target_logit, const float* grad, float softcap, bool compute_lse, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (coeff_type) {
    case CoeffType::kBFloat16:
      return launch_typed<__nv_bfloat16>(logits, rows, vocab, logits_stride, coeff, coeff_stride,
                                         targets, lse, target_logit, grad, softcap, compute_lse,
                                         stream);
    case CoeffType::kFloat16:
      return launch_typed<__half>(logits, rows, vocab, logits_stride, coeff, coeff_stride, targets,
                                  lse, target_logit, grad, softcap, compute_lse, stream);
    case CoeffType::kFloat32:
    case CoeffType::kNone:
      return launch_typed<float>(logits, rows, vocab, logits_stride,
                                 coeff_type == CoeffType::kNone ? nullptr : coeff, coeff_stride,
                                 targets, lse, target_logit, grad, softcap, compute_lse, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace autoregembed_fast
