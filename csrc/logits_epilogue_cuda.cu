// CUDA epilogue kernels of the chunked route: one block of threads per token row streams over the
// row's logits in one vocabulary chunk (produced by a cuBLAS GEMM) and writes what the next GEMM needs.
// No torch headers (see logits_epilogue_cuda.h for the contracts).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math_constants.h>

#include "epilogue_math.h"
#include "logits_epilogue_cuda.h"

namespace autoregembed_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Reduces one value per thread over the block; every thread gets the result.
template <typename Op>
__device__ float block_reduce(float value, Op op) {
  __shared__ float per_warp[kWarps];
  __shared__ float result;
  for (int offset = 16; offset > 0; offset /= 2) {
    value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (threadIdx.x % 32 == 0) per_warp[threadIdx.x / 32] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = per_warp[0];
    for (int w = 1; w < kWarps; ++w) total = op(total, per_warp[w]);
    result = total;
  }
  __syncthreads();
  return result;
}

__device__ __forceinline__ float apply_softcap(float z, float softcap) {
  return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

__device__ __forceinline__ float slope_of(float capped, float softcap) {
  return softcap > 0.f ? softcap_slope(capped, 1.f / softcap) : 1.f;
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

template <typename weights_t>
__global__ void __launch_bounds__(kThreads) online_softmax_chunk_kernel(
    float* logits, int64_t chunk, int64_t col_offset, int64_t logits_stride, weights_t* weights,
    int64_t weights_stride, float* alpha, const int64_t* targets, float* running_max,
    float* running_sumexp, float* target_logit, float softcap) {
  const int64_t row = blockIdx.x;
  float* z = logits + row * logits_stride;
  const int64_t target = targets[row] - col_offset;

  float thread_max = -CUDART_INF_F;
  for (int64_t v = threadIdx.x; v < chunk; v += kThreads) {
    float x = z[v];
    if (softcap > 0.f) {
      x = apply_softcap(x, softcap);
      z[v] = x;
    }
    // fmaxf drops NaN; a NaN logit still reaches the sum below and makes the log-sum-exp NaN.
    thread_max = fmaxf(thread_max, x);
  }
  const float old_max = running_max[row];
  const float new_max = fmaxf(old_max, block_reduce(thread_max, MaxOp{}));

  float thread_sumexp = 0.f;
  for (int64_t v = threadIdx.x; v < chunk; v += kThreads) {
    const float x = z[v];  // written by this same thread above
    const float unnormalised = expf(x - new_max);
    thread_sumexp += unnormalised;
    if (v == target) target_logit[row] += x;
    if (weights != nullptr) {
      // The target's own term is left to the driver, which forms it in fp32 at the end.
      const float weight = v == target ? 0.f : unnormalised * slope_of(x, softcap);
      weights[row * weights_stride + v] = from_float<weights_t>(weight);
    }
  }
  const float chunk_sumexp = block_reduce(thread_sumexp, SumOp{});
  if (threadIdx.x == 0) {
    const float rescale = expf(old_max - new_max);
    running_max[row] = new_max;
    running_sumexp[row] = running_sumexp[row] * rescale + chunk_sumexp;
    if (weights != nullptr) alpha[row] = rescale;
  }
}

template <typename coeff_t>
__global__ void __launch_bounds__(kThreads) grad_coefficients_chunk_kernel(
    float* logits, int64_t chunk, int64_t col_offset, int64_t logits_stride, coeff_t* coeff,
    int64_t coeff_stride, const int64_t* targets, const float* lse, const float* grad,
    float softcap) {
  const int64_t row = blockIdx.x;
  const float* z = logits + row * logits_stride;
  coeff_t* out = coeff + row * coeff_stride;
  const int64_t target = targets[row] - col_offset;
  const float row_lse = lse[row];
  const float scale = grad[row];
  for (int64_t v = threadIdx.x; v < chunk; v += kThreads) {
    const float x = apply_softcap(z[v], softcap);
    out[v] = from_float<coeff_t>(
        grad_coefficient(expf(x - row_lse), slope_of(x, softcap), v == target, scale));
  }
}

template <typename weights_t>
cudaError_t launch_online_typed(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* weights, int64_t weights_stride, float* alpha, const int64_t* targets,
    float* running_max, float* running_sumexp, float* target_logit, float softcap,
    cudaStream_t stream) {
  online_softmax_chunk_kernel<weights_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, chunk, col_offset, logits_stride, static_cast<weights_t*>(weights), weights_stride,
      alpha, targets, running_max, running_sumexp, target_logit, softcap);
  return cudaGetLastError();
}

template <typename coeff_t>
cudaError_t launch_coefficients_typed(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* coeff, int64_t coeff_stride, const int64_t* targets, const float* lse,
    const float* grad, float softcap, cudaStream_t stream) {
  grad_coefficients_chunk_kernel<coeff_t><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, chunk, col_offset, logits_stride, static_cast<coeff_t*>(coeff), coeff_stride,
      targets, lse, grad, softcap);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_online_softmax_chunk(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* weights, FloatType weights_type, int64_t weights_stride, float* alpha,
    const int64_t* targets, float* running_max, float* running_sumexp, float* target_logit,
    float softcap, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (weights_type) {
    case FloatType::kFloat32:
      return launch_online_typed<float>(logits, rows, chunk, col_offset, logits_stride, weights,
                                        weights_stride, alpha, targets, running_max,
                                        running_sumexp, target_logit, softcap, stream);
    case FloatType::kBFloat16:
      return launch_online_typed<__nv_bfloat16>(logits, rows, chunk, col_offset, logits_stride,
                                                weights, weights_stride, alpha, targets,
                                                running_max, running_sumexp, target_logit, softcap,
                                                stream);
    case FloatType::kFloat16:
      return launch_online_typed<__half>(logits, rows, chunk, col_offset, logits_stride, weights,
                                         weights_stride, alpha, targets, running_max,
                                         running_sumexp, target_logit, softcap, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_coefficients_chunk(
    float* logits, int64_t rows, int64_t chunk, int64_t col_offset, int64_t logits_stride,
    void* coeff, FloatType coeff_type, int64_t coeff_stride, const int64_t* targets,
    const float* lse, const float* grad, float softcap, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (coeff_type) {
    case FloatType::kFloat32:
      return launch_coefficients_typed<float>(logits, rows, chunk, col_offset, logits_stride, coeff,
                                              coeff_stride, targets, lse, grad, softcap, stream);
    case FloatType::kBFloat16:
      return launch_coefficients_typed<__nv_bfloat16>(logits, rows, chunk, col_offset,
                                                      logits_stride, coeff, coeff_stride, targets,
                                                      lse, grad, softcap, stream);
    case FloatType::kFloat16:
      return launch_coefficients_typed<__half>(logits, rows, chunk, col_offset, logits_stride,
                                               coeff, coeff_stride, targets, lse, grad, softcap,
                                               stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace autoregembed_fast
