// CPU backend of token_logprobs: chunked GEMM through ATen's BLAS plus one fused epilogue per block.
//
// For a block of C tokens the logits Z = H_c W^T (+ b) go into one reused C x V buffer; each row is
// then capped, reduced to its log-sum-exp and, when a gradient is wanted, turned into the gradient
// coefficients G (see row_epilogue.h), in place or, for the bf16 GEMMs, rounded into one bf16 buffer,
// so that the second GEMM G @ W gives the rows of d log p / d hidden directly. Memory is one C x V
// block, never N x V.
//
// Accumulation type: float64 inputs are computed in float64 (so gradcheck is meaningful), every other
// dtype in float32. bf16 inputs on a CPU with AVX512-BF16 (when the caller asks, `bf16_gemm`) keep
// their dtype in the GEMMs, which still accumulate and output in fp32 (bf16_gemm_cpu.h); elsewhere
// they are upcast to fp32 once per call. The float row routines are compiled for AVX-512, AVX2 and
// baseline x86 and picked at load time (target_clones), so the extension stays portable while using
// the wide vectors here.
#include "token_logprobs.h"

#include <ATen/Parallel.h>

#include "bf16_gemm_cpu.h"

#include <algorithm>

#include "row_epilogue.h"

#if defined(__x86_64__) && defined(__linux__)
#define AEF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AEF_CPU_CLONES
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define AEF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define AEF_BF16_TARGET
#endif

namespace autoregembed_fast {
namespace {

// The row routines of the epilogue, for float in AVX-512 / AVX2 / baseline clones.
AEF_CPU_CLONES void softcap_row(float* z, int64_t V, float cap) { apply_softcap(z, V, cap); }
void softcap_row(double* z, int64_t V, double cap) { apply_softcap(z, V, cap); }

AEF_CPU_CLONES float logsumexp_row(const float* z, int64_t V) { return logsumexp(z, V); }
double logsumexp_row(const double* z, int64_t V) { return logsumexp(z, V); }

// The gradient coefficients written over the row's logits.
AEF_CPU_CLONES void coefficients_row(float* z, int64_t V, float cap, int64_t target, float lse,
                                     float scale) {
  logprob_grad_coefficients(z, V, cap, target, lse, scale, z);
}
void coefficients_row(double* z, int64_t V, double cap, int64_t target, double lse, double scale) {
  logprob_grad_coefficients(z, V, cap, target, lse, scale, z);
}

// The gradient coefficients rounded to bf16 into out, for the bf16 GEMMs: formed in fp32 by slices
// that stay in L1 and rounded from there, so that neither G in fp32 nor a rounding pass over it goes
// through memory (the logits row is only read).
AEF_BF16_TARGET void coefficients_row_to_bf16(const float* z, int64_t V, float cap, int64_t target,
                                              float lse, float scale, at::BFloat16* out) {
  constexpr int64_t SLICE = 1024;
  alignas(64) float slice[SLICE];
  for (int64_t v0 = 0; v0 < V; v0 += SLICE) {
    const int64_t n = std::min(SLICE, V - v0);
    logprob_grad_coefficients(z + v0, n, cap, target - v0, lse, scale, slice);
    round_to_bf16(slice, n, out + v0);
  }
}

// The GEMMs of a block come from one of two strategies with the same interface, picked once per call
// (with_head_gemms):
//   logits(block, hidden_rows)                      block <- hidden_rows @ W^T (+ bias)
//   write_coefficients(z, r, cap, target, lse, s)   row r of the block's coefficients G,
//                                                   s * d log p[target] / d logits, from capped z
//   coefficients_times_head(out, block)             out [rows, d] <- G @ W (Jacobian rows or dH)
//   add_weight_gradient(grad_weight, block, hidden_rows)   grad_weight += G^T @ hidden_rows
// After write_coefficients, the block buffer holds G in the accumulation dtype whenever a bias
// gradient is asked for (its column sums are taken there).

// ATen's GEMMs in the accumulation dtype acc_t on the head upcast once per call; G lies over the
// logits.
template <typename acc_t>
class AtenHeadGemms {
 public:
  AtenHeadGemms(const at::Tensor& weight, const c10::optional<at::Tensor>& bias)
      : vocab_(weight.size(0)), weight_(weight.to(scalar_type()).contiguous()) {
    if (bias.has_value()) bias_ = bias->to(scalar_type()).contiguous();
  }

  static at::ScalarType scalar_type() { return c10::CppTypeToScalarType<acc_t>::value; }
  int64_t vocab() const { return vocab_; }

  void logits(at::Tensor& block, const at::Tensor& hidden_rows) const {
    const at::Tensor rows = hidden_rows.to(scalar_type());
    if (bias_.has_value()) {
      at::addmm_out(block, *bias_, rows, weight_.t());
    } else {
      at::mm_out(block, rows, weight_.t());
    }
  }

  void write_coefficients(acc_t* z, int64_t, acc_t cap, int64_t target, acc_t lse,
                          acc_t scale) const {
    coefficients_row(z, vocab_, cap, target, lse, scale);
  }

  void coefficients_times_head(at::Tensor& out, const at::Tensor& block) const {
    at::mm_out(out, block, weight_);
  }

  void add_weight_gradient(at::Tensor& grad_weight, const at::Tensor& block,
                           const at::Tensor& hidden_rows) const {
    grad_weight.addmm_(block.t(), hidden_rows.to(scalar_type()));
  }

 private:
  int64_t vocab_;
  at::Tensor weight_;
  c10::optional<at::Tensor> bias_;
};

// bf16_gemm (bf16_gemm_cpu.h) on the bf16 head packed once per call (two packed copies, no fp32
// copy), for bf16 inputs on a CPU with AVX512-BF16; fp32 logits. G is rounded to bf16, as in eager
// bf16 autograd (the GEMMs' sums stay fp32), into one buffer [rows, V rounded up to even]; with a bias
// gradient it is also kept in fp32 over the logits (a column sum of bf16-rounded G lost ~0.3 %).
class Bf16HeadGemms {
 public:
  // coefficient_gemm: G @ W will be asked for; coefficient_rows: the most rows of a block whose
  // coefficients are written (0: none).
  Bf16HeadGemms(const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                bool coefficient_gemm, int64_t coefficient_rows, bool bias_gradient)
      : fp32_coefficients_(bias_gradient), vocab_(weight.size(0)), hidden_size_(weight.size(1)) {
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16(),
                "token_logprobs_cpu: bf16_gemm needs bf16 inputs and a CPU with AVX512-BF16");
    if (bias.has_value()) bias_ = bias->to(at::kFloat).contiguous();
    packed_for_logits_ = pack_bf16_right_operand(weight.t());
    if (coefficient_gemm) packed_for_coefficients_ = pack_bf16_right_operand(weight);
    // One buffer for every block of the call (a fresh one per block cost ~30 ms of page faults each
    // at 64 MiB); zeros, so that an odd V's pad column stays 0 in the sums over V.
    if (coefficient_rows > 0) {
      coefficients_ = at::zeros({coefficient_rows, width()}, weight.options());
    }
  }

  int64_t vocab() const { return vocab_; }

  void logits(at::Tensor& block, const at::Tensor& hidden_rows) const {
    const at::Tensor left = even_width(hidden_rows);
    bf16_gemm(left.data_ptr<at::BFloat16>(), left.size(1), packed_for_logits_, block.size(0), vocab_,
              left.size(1), block.data_ptr<float>(), vocab_, false,
              bias_.has_value() ? bias_->data_ptr<float>() : nullptr);
  }

  void write_coefficients(float* z, int64_t r, float cap, int64_t target, float lse,
                          float scale) const {
    at::BFloat16* out = coefficients_.data_ptr<at::BFloat16>() + r * width();
    if (fp32_coefficients_) {
      coefficients_row(z, vocab_, cap, target, lse, scale);
      round_to_bf16(z, vocab_, out);
    } else {
      coefficients_row_to_bf16(z, vocab_, cap, target, lse, scale, out);
    }
  }

  void coefficients_times_head(at::Tensor& out, const at::Tensor& block) const {
    bf16_gemm(coefficients_.data_ptr<at::BFloat16>(), width(), packed_for_coefficients_,
              block.size(0), hidden_size_, width(), out.data_ptr<float>(), hidden_size_, false,
              nullptr);
  }

  // G^T [V, rows] is the left operand and the hidden rows [rows, d] the packed right one.
  void add_weight_gradient(at::Tensor& grad_weight, const at::Tensor& block,
                           const at::Tensor& hidden_rows) const {
    const int64_t rows = block.size(0);
    const int64_t padded_rows = rows + rows % 2;
    // Sized by the first (largest) block, it serves the call's every block.
    if (!transposed_coefficients_.defined()) {
      transposed_coefficients_ = at::empty({vocab_, padded_rows}, coefficients_.options());
    }
    const int64_t ld = transposed_coefficients_.size(1);
    at::BFloat16* transposed = transposed_coefficients_.data_ptr<at::BFloat16>();
    transpose_bf16(coefficients_.data_ptr<at::BFloat16>(), rows, vocab_, width(), transposed, ld);
    bf16_gemm(transposed, ld, pack_bf16_right_operand(hidden_rows), vocab_, hidden_size_,
              padded_rows, grad_weight.data_ptr<float>(), hidden_size_, true, nullptr);
  }

 private:
  // A contiguous bf16 matrix with an even number of columns (a zero column appended to an odd one).
  static at::Tensor even_width(const at::Tensor& rows) {
    return rows.size(1) % 2 ? at::constant_pad_nd(rows, {0, 1}) : rows.contiguous();
  }

  int64_t width() const { return vocab_ + vocab_ % 2; }

  bool fp32_coefficients_;
  int64_t vocab_, hidden_size_;
  c10::optional<at::Tensor> bias_;
  at::Tensor packed_for_logits_, packed_for_coefficients_;
  at::Tensor coefficients_;  // [most rows of a block, V rounded up to even], the pad column 0
  mutable at::Tensor transposed_coefficients_;  // [V, block rows rounded up to even]
};

// Calls body(gemms, cap) with the call's strategy and the softcap in its accumulation dtype: float64
// for float64 inputs (so that gradcheck is meaningful), float32 for every other dtype.
template <typename Body>
void with_head_gemms(const at::Tensor& hidden, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const Gradients& gradients,
                     const SweepOptions& options, Body body) {
  const int64_t coefficient_rows =
      gradients.any() ? std::min(options.block_rows, hidden.size(0)) : 0;
  if (options.bf16_gemm) {
    body(Bf16HeadGemms(weight, bias, gradients.hidden, coefficient_rows, gradients.bias),
         static_cast<float>(options.softcap));
  } else if (hidden.scalar_type() == at::kDouble) {
    body(AtenHeadGemms<double>(weight, bias), options.softcap);
  } else {
    body(AtenHeadGemms<float>(weight, bias), static_cast<float>(options.softcap));
  }
}

// The outputs a sweep adds to block by block; each undefined unless asked for.
struct GradientOutputs {
  at::Tensor hidden;  // [N, d]: d log p / d hidden (forward) or grad hidden (backward)
  at::Tensor weight;  // [V, d], zeros to start
  at::Tensor bias;    // [V], zeros to start
};

// The block loop of both entry points. Per block of at most block_rows rows: the logits GEMM, the
// softcap and row_epilogue(row, r, token) on each row in parallel (r the row in the block, token its
// index in hidden), which writes the row's coefficients through gemms when a gradient is asked for;
// then the gradients from the block's coefficients: G @ W, G^T @ H and G's column sums.
template <typename acc_t, typename Gemms, typename RowEpilogue>
void sweep_blocks(const at::Tensor& hidden, const Gemms& gemms, acc_t cap, int64_t block_rows,
                  GradientOutputs& outputs, const RowEpilogue& row_epilogue) {
  const int64_t N = hidden.size(0), V = gemms.vocab();
  at::Tensor logits = at::empty({std::min(block_rows, N), V},
                                hidden.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  for (int64_t start = 0; start < N; start += block_rows) {
    const int64_t rows = std::min(block_rows, N - start);
    at::Tensor block = logits.narrow(0, 0, rows);
    const at::Tensor hidden_rows = hidden.narrow(0, start, rows);
    gemms.logits(block, hidden_rows);
    acc_t* z = block.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* row = z + r * V;
        if (cap > 0) softcap_row(row, V, cap);
        row_epilogue(row, r, start + r);
      }
    });
    if (outputs.hidden.defined()) {
      at::Tensor hidden_gradient_rows = outputs.hidden.narrow(0, start, rows);
      gemms.coefficients_times_head(hidden_gradient_rows, block);
    }
    if (outputs.bias.defined()) outputs.bias.add_(block.sum(0));
    if (outputs.weight.defined()) gemms.add_weight_gradient(outputs.weight, block, hidden_rows);
  }
}

at::ScalarType accumulation_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_internal_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& targets,
                           const Gradients& gradients, const SweepOptions& options) {
  // The Python layer validates user input; these guard the C++ entry points against misuse.
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "token_logprobs_cpu: expected hidden [N, d] and weight [V, d]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "token_logprobs_cpu: expected int64 targets [N]");
  TORCH_CHECK(options.block_rows > 0, "token_logprobs_cpu: block_rows must be positive");
  TORCH_CHECK(!gradients.bias || bias.has_value(),
              "token_logprobs_cpu: a bias gradient was asked for without a bias");
  TORCH_CHECK(targets.numel() == 0 ||
                  (targets.min().item<int64_t>() >= 0 &&
                   targets.max().item<int64_t>() < weight.size(0)),
              "token_logprobs_cpu: targets must lie in [0, V)");
}

GradientOutputs gradient_outputs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const Gradients& gradients) {
  const auto options = hidden.options().dtype(accumulation_type(hidden));
  GradientOutputs outputs;
  if (gradients.hidden) outputs.hidden = at::empty({hidden.size(0), weight.size(1)}, options);
  if (gradients.weight) outputs.weight = at::zeros(weight.sizes(), options);
  if (gradients.bias) outputs.bias = at::zeros({weight.size(0)}, options);
  return outputs;
}

}  // namespace

std::vector<at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const Gradients& gradients, const SweepOptions& options) {
  check_internal_inputs(hidden, weight, bias, targets, gradients, options);
  const int64_t N = hidden.size(0);
  const auto acc_options = hidden.options().dtype(accumulation_type(hidden));
  at::Tensor logp = at::empty({N}, acc_options);
  at::Tensor lse = at::empty({N}, acc_options);
  GradientOutputs outputs = gradient_outputs(hidden, weight, gradients);
  if (N > 0) {
    const at::Tensor targets_c = targets.contiguous();
    with_head_gemms(hidden, weight, bias, gradients, options, [&](const auto& gemms, auto cap) {
      using acc_t = decltype(cap);
      const int64_t V = gemms.vocab();
      const int64_t* target_ptr = targets_c.data_ptr<int64_t>();
      acc_t* lse_ptr = lse.data_ptr<acc_t>();
      acc_t* logp_ptr = logp.data_ptr<acc_t>();
      const bool coefficients = gradients.any();
      sweep_blocks(hidden, gemms, cap, options.block_rows, outputs,
                   [&](acc_t* row, int64_t r, int64_t token) {
                     const acc_t row_lse = logsumexp_row(row, V);
                     lse_ptr[token] = row_lse;
                     logp_ptr[token] = row[target_ptr[token]] - row_lse;
                     if (coefficients) {
                       gemms.write_coefficients(row, r, cap, target_ptr[token], row_lse, acc_t(1));
                     }
                   });
    });
  }
  return {logp, lse, outputs.hidden, outputs.weight, outputs.bias};
}

std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp,
    const Gradients& gradients, const SweepOptions& options) {
  check_internal_inputs(hidden, weight, bias, targets, gradients, options);
  TORCH_CHECK(lse.scalar_type() == accumulation_type(hidden) &&
                  grad_logp.scalar_type() == accumulation_type(hidden),
              "token_logprobs_cpu: lse and grad_logp must be in the accumulation dtype");
  GradientOutputs outputs = gradient_outputs(hidden, weight, gradients);
  if (hidden.size(0) > 0 && gradients.any()) {
    const at::Tensor targets_c = targets.contiguous();
    const at::Tensor lse_c = lse.contiguous();
    const at::Tensor grad_c = grad_logp.contiguous();
    with_head_gemms(hidden, weight, bias, gradients, options, [&](const auto& gemms, auto cap) {
      using acc_t = decltype(cap);
      const int64_t* target_ptr = targets_c.data_ptr<int64_t>();
      const acc_t* lse_ptr = lse_c.data_ptr<acc_t>();
      const acc_t* grad_ptr = grad_c.data_ptr<acc_t>();
      sweep_blocks(hidden, gemms, cap, options.block_rows, outputs,
                   [&](acc_t* row, int64_t r, int64_t token) {
                     gemms.write_coefficients(row, r, cap, target_ptr[token], lse_ptr[token],
                                              grad_ptr[token]);
                   });
    });
  }
  return {outputs.hidden, outputs.weight, outputs.bias};
}

}  // namespace autoregembed_fast
