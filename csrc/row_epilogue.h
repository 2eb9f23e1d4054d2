// Per-row epilogue of the chunked log-likelihood op: softcap, log-sum-exp and the gradient
// coefficients of log p[target] with respect to the raw logits, each a streaming pass over one row of
// V logits held in a block buffer. Plain C++ with no torch types, so the same math can be reused by any
// driver; the float versions are written so that gcc vectorises them: they rely on setup.py's
// -fno-trapping-math -fno-math-errno and on the target_clones of token_logprobs_cpu.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "epilogue_math.h"

namespace autoregembed_fast {

// exp for float in the shape gcc vectorises: clamped argument, magic-number rounding, a degree-6
// polynomial (Cephes expf coefficients) and an exponent bit cast. Max relative error ~1e-7 on
// [-87, 88]; below -87 it returns ~1e-38 instead of a denormal, which no sum of probabilities notices.
__attribute__((always_inline)) inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float k = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, exponent_bits);
}

__attribute__((always_inline)) inline double fast_exp(double x) { return std::exp(x); }

// tanh through exp so that it vectorises; saturates to +-1 for large |x|.
__attribute__((always_inline)) inline float fast_tanh(float x) {
  return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
}

__attribute__((always_inline)) inline double fast_tanh(double x) { return std::tanh(x); }

// z <- cap * tanh(z / cap), in place.
template <typename acc_t>
__attribute__((always_inline)) inline void apply_softcap(acc_t* z, int64_t V, acc_t cap) {
  const acc_t inv_cap = acc_t(1) / cap;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) z[v] = cap * fast_tanh(z[v] * inv_cap);
}

// log(sum(exp(z))), or NaN when the row holds a NaN or an infinite logit. The non-finite check rides
// on a plain sum computed in the same pass as the max, so it costs next to nothing.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t logsumexp(const acc_t* z, int64_t V) {
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  acc_t row_sum = 0;
#pragma omp simd reduction(max : row_max) reduction(+ : row_sum)
  for (int64_t v = 0; v < V; ++v) {
    // A ternary, not std::max: gcc vectorises this form of the max reduction, not the other.
    row_max = z[v] > row_max ? z[v] : row_max;
    row_sum += z[v];
  }
  if (!std::isfinite(row_sum)) return std::numeric_limits<acc_t>::quiet_NaN();
  acc_t exp_sum = 0;
#pragma omp simd reduction(+ : exp_sum)
  for (int64_t v = 0; v < V; ++v) exp_sum += fast_exp(z[v] - row_max);
  return row_max + std::log(exp_sum);
}

// out <- scale * d log p[target] / d z_raw for the (already capped) logits z, where z_raw are the logits
// before the softcap (formulas in epilogue_math.h); out may be z itself. Multiplying the result by W
// gives scale * d log p / d hidden. `target` may lie outside [0, V) (a slice of a row without it).
template <typename acc_t>
__attribute__((always_inline)) inline void logprob_grad_coefficients(
    const acc_t* z, int64_t V, acc_t cap, int64_t target, acc_t lse, acc_t scale, acc_t* out) {
  if (cap > 0) {
    const acc_t inv_cap = acc_t(1) / cap;
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      out[v] = grad_coefficient(fast_exp(z[v] - lse), softcap_slope(z[v], inv_cap), v == target, scale);
    }
  } else {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      out[v] = grad_coefficient(fast_exp(z[v] - lse), acc_t(1), v == target, scale);
    }
  }
}

}  // namespace autoregembed_fast
