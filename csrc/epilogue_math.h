// Formulas of the log-likelihood epilogue shared by the C++ CPU backend (row_epilogue.h) and the CUDA
// epilogue kernel (logits_epilogue_cuda.cu), so that the CPU tests exercise the same expressions the
// GPU runs. Plain C++ usable from host and device code; no torch headers.
#pragma once

#if defined(__CUDACC__)
#define AEF_HOST_DEVICE __host__ __device__
#else
#define AEF_HOST_DEVICE
#endif

namespace autoregembed_fast {

// d cap(z) / dz for the softcap cap(z) = c * tanh(z / c), written through the capped value:
// 1 - tanh^2 = 1 - (cap(z) / c)^2.
template <typename T>
AEF_HOST_DEVICE inline T softcap_slope(T capped_logit, T inv_cap) {
  const T ratio = capped_logit * inv_cap;
  return T(1) - ratio * ratio;
}

// scale * d log p[target] / d z_v for the raw logit z_v: scale * (onehot - softmax_v) * cap'(z_v).
template <typename T>
AEF_HOST_DEVICE inline T grad_coefficient(T prob, T slope, bool is_target, T scale) {
  return scale * ((is_target ? T(1) : T(0)) - prob) * slope;
}

}  // namespace autoregembed_fast
