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
#include <type_traits>

#include "row_epilogue.h"

#if defined(__x86_64__) && defined(__linux__)
#define AEF_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AEF_CPU_CLONES
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

#if defined(__x86_64__) && defined(__GNUC__)
// The gradient coefficients rounded to bf16 into out, for the bf16 GEMMs: formed in fp32 by slices
// that stay in L1 and rounded from there, so that neither G in fp32 nor a rounding pass over it goes
// through memory (the logits row is only read).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void coefficients_row_to_bf16(
    const float* z, int64_t V, float cap, int64_t target, float lse, float scale, at::BFloat16* out) {
  constexpr int64_t SLICE = 1024;
  alignas(64) float slice[SLICE];
  for (int64_t v0 = 0; v0 < V; v0 += SLICE) {
    const int64_t n = std::min(SLICE, V - v0);
    logprob_grad_coefficients(z + v0, n, cap, target - v0, lse, scale, slice);
    round_to_bf16(slice, n, out + v0);
  }
}
#endif

at::ScalarType accumulation_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The GEMMs of a block: ATen's in the accumulation dtype on the upcast head, or, for bf16 inputs on an
// AVX512-BF16 CPU, bf16_gemm on the bf16 head packed once per call (two packed copies: no fp32 copy).
// A block's gradient coefficients G, written row by row through write_coefficients, lie over its
// logits on the first route and in one bf16 buffer [rows, V rounded up to even] on the second, where
// they are rounded to bf16 as in eager bf16 autograd (the GEMMs' sums stay fp32).
class HeadGemms {
 public:
  // coefficient_gemm: G @ W will be asked for; coefficient_rows: the most rows of a block whose
  // coefficients are written (0: none); bias_gradient: the column sums of G will be asked for (G is
  // then also kept in fp32 over the logits on the bf16 route: a sum of bf16-rounded G lost ~0.3 %).
  HeadGemms(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::ScalarType acc,
            bool bf16, bool coefficient_gemm, int64_t coefficient_rows, bool bias_gradient)
      : bf16_(bf16), fp32_coefficients_(!bf16 || bias_gradient), vocab_(weight.size(0)),
        hidden_size_(weight.size(1)) {
    if (bias.has_value()) bias_acc_ = bias->to(acc).contiguous();
    if (!bf16_) {
      weight_acc_ = weight.to(acc).contiguous();
      return;
    }
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16(),
                "token_logprobs_cpu: bf16_gemm needs bf16 inputs and a CPU with AVX512-BF16");
    packed_for_logits_ = pack_bf16_right_operand(weight.t());
    if (coefficient_gemm) packed_for_coefficients_ = pack_bf16_right_operand(weight);
    // One buffer for every block of the call (a fresh one per block cost ~30 ms of page faults each
    // at 64 MiB); zeros, so that an odd V's pad column stays 0 in the sums over V.
    if (coefficient_rows > 0) {
      coefficients_bf16_ = at::zeros({coefficient_rows, vocab_ + vocab_ % 2},
                                     weight.options().dtype(at::kBFloat16));
    }
  }

  // logits <- hidden_rows @ W^T (+ bias), into the block buffer (accumulation dtype).
  void logits(at::Tensor& block, const at::Tensor& hidden_rows) const {
    if (!bf16_) {
      const at::Tensor rows = hidden_rows.to(weight_acc_.scalar_type());
      if (bias_acc_.has_value()) {
        at::addmm_out(block, *bias_acc_, rows, weight_acc_.t());
      } else {
        at::mm_out(block, rows, weight_acc_.t());
      }
      return;
    }
    const at::Tensor left = even_width(hidden_rows);
    bf16_gemm(left.data_ptr<at::BFloat16>(), left.size(1), packed_for_logits_, block.size(0), vocab_,
              left.size(1), block.data_ptr<float>(), vocab_, false,
              bias_acc_.has_value() ? bias_acc_->data_ptr<float>() : nullptr);
  }

  // Row r of the block's coefficients, scale * d log p[target] / d logits, from its capped logits z.
  template <typename acc_t>
  void write_coefficients(acc_t* z, int64_t r, acc_t cap, int64_t target, acc_t lse,
                          acc_t scale) const {
    if (fp32_coefficients_) coefficients_row(z, vocab_, cap, target, lse, scale);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (!bf16_) return;
      at::BFloat16* out = coefficients_bf16_.data_ptr<at::BFloat16>() + r * bf16_width();
      if (fp32_coefficients_) {
        round_to_bf16(z, vocab_, out);
        return;
      }
#if defined(__x86_64__) && defined(__GNUC__)
      coefficients_row_to_bf16(z, vocab_, cap, target, lse, scale, out);
#else
      // The constructor refuses the bf16 route without AVX512-BF16, so this is never reached.
      TORCH_CHECK(false, "token_logprobs_cpu: the bf16 GEMM route exists on x86 only");
#endif
    }
  }

  // out [rows, d] <- G @ W: the Jacobian rows (or dH).
  void coefficients_times_head(at::Tensor& out, const at::Tensor& block) const {
    if (!bf16_) {
      at::mm_out(out, block, weight_acc_);
      return;
    }
    bf16_gemm(coefficients_bf16_.data_ptr<at::BFloat16>(), bf16_width(), packed_for_coefficients_,
              block.size(0), hidden_size_, bf16_width(), out.data_ptr<float>(), hidden_size_, false,
              nullptr);
  }

  // grad_weight += G^T @ hidden_rows, grad_bias += column sums of G (from G in fp32 over the block).
  void add_head_gradients(at::Tensor& grad_weight, at::Tensor& grad_bias, const at::Tensor& block,
                          const at::Tensor& hidden_rows) const {
    if (grad_bias.defined()) grad_bias.add_(block.sum(0));
    if (!grad_weight.defined()) return;
    if (!bf16_) {
      grad_weight.addmm_(block.t(), hidden_rows.to(block.scalar_type()));
      return;
    }
    const int64_t rows = block.size(0);
    const at::Tensor coefficients = coefficients_bf16_.narrow(0, 0, rows);
    // G^T [V, rows] is the left operand and the hidden rows [rows, d] the packed right one. The
    // transposed buffer is sized by the first (largest) block and serves the call's every block.
    const int64_t width = rows + rows % 2;
    if (!transposed_coefficients_bf16_.defined()) {
      transposed_coefficients_bf16_ = at::empty({vocab_, width}, coefficients.options());
    }
    const int64_t ld = transposed_coefficients_bf16_.size(1);
    at::BFloat16* transposed = transposed_coefficients_bf16_.data_ptr<at::BFloat16>();
    transpose_bf16(coefficients.data_ptr<at::BFloat16>(), rows, vocab_, bf16_width(), transposed, ld);
    bf16_gemm(transposed, ld, pack_bf16_right_operand(hidden_rows), vocab_, hidden_size_, width,
              grad_weight.data_ptr<float>(), hidden_size_, true, nullptr);
  }

 private:
  // A contiguous bf16 matrix with an even number of columns (a zero column appended to an odd one).
  static at::Tensor even_width(const at::Tensor& rows) {
    return rows.size(1) % 2 ? at::constant_pad_nd(rows, {0, 1}) : rows.contiguous();
  }

  int64_t bf16_width() const { return vocab_ + vocab_ % 2; }

  bool bf16_;
  bool fp32_coefficients_;  // G over the logits (always on the fp32 route)
  int64_t vocab_, hidden_size_;
  at::Tensor weight_acc_;
  c10::optional<at::Tensor> bias_acc_;
  at::Tensor packed_for_logits_, packed_for_coefficients_;
  at::Tensor coefficients_bf16_;  // [most rows of a block, V rounded up to even], the pad column 0
  mutable at::Tensor transposed_coefficients_bf16_;  // [V, block rows rounded up to even]
};

void check_internal_inputs(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
    int64_t block_rows) {
  // The Python layer validates user input; these guard the C++ entry points against misuse.
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "token_logprobs_cpu: expected hidden [N, d] and weight [V, d]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "token_logprobs_cpu: expected int64 targets [N]");
  TORCH_CHECK(block_rows > 0, "token_logprobs_cpu: block_rows must be positive");
  TORCH_CHECK(targets.numel() == 0 ||
                  (targets.min().item<int64_t>() >= 0 &&
                   targets.max().item<int64_t>() < weight.size(0)),
              "token_logprobs_cpu: targets must lie in [0, V)");
}

template <typename acc_t>
void forward_impl(
    const at::Tensor& hidden, const HeadGemms& gemms, int64_t V, const at::Tensor& targets, acc_t cap,
    int64_t block_rows, at::Tensor& logp, at::Tensor& lse, at::Tensor& jacobian,
    at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t N = hidden.size(0);
  // Each row's gradient coefficients d log p / d logits are written (HeadGemms::write_coefficients)
  // when any gradient is formed here: the Jacobian (G @ W) and the head's gradients of sum(log p)
  // (G^T @ H, sum of G).
  const bool coefficients = jacobian.defined() || grad_weight.defined() || grad_bias.defined();
  at::Tensor logits = at::empty({std::min(block_rows, N), V}, logp.options());
  const int64_t* target_ptr = targets.data_ptr<int64_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  acc_t* logp_ptr = logp.data_ptr<acc_t>();
  for (int64_t start = 0; start < N; start += block_rows) {
    const int64_t rows = std::min(block_rows, N - start);
    at::Tensor block = logits.narrow(0, 0, rows);
    const at::Tensor hidden_rows = hidden.narrow(0, start, rows);
    gemms.logits(block, hidden_rows);
    acc_t* z = block.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t token = start + r;
        acc_t* row = z + r * V;
        if (cap > 0) softcap_row(row, V, cap);
        const acc_t row_lse = logsumexp_row(row, V);
        lse_ptr[token] = row_lse;
        logp_ptr[token] = row[target_ptr[token]] - row_lse;
        if (coefficients) gemms.write_coefficients(row, r, cap, target_ptr[token], row_lse, acc_t(1));
      }
    });
    if (jacobian.defined()) {
      at::Tensor jacobian_rows = jacobian.narrow(0, start, rows);
      gemms.coefficients_times_head(jacobian_rows, block);
    }
    gemms.add_head_gradients(grad_weight, grad_bias, block, hidden_rows);
  }
}

template <typename acc_t>
void backward_impl(
    const at::Tensor& hidden, const HeadGemms& gemms, int64_t V, const at::Tensor& targets,
    const at::Tensor& lse, const at::Tensor& grad_logp, acc_t cap, int64_t block_rows,
    at::Tensor& grad_hidden, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t N = hidden.size(0);
  at::Tensor logits = at::empty({std::min(block_rows, N), V}, lse.options());
  const int64_t* target_ptr = targets.data_ptr<int64_t>();
  const acc_t* lse_ptr = lse.data_ptr<acc_t>();
  const acc_t* grad_ptr = grad_logp.data_ptr<acc_t>();
  for (int64_t start = 0; start < N; start += block_rows) {
    const int64_t rows = std::min(block_rows, N - start);
    at::Tensor block = logits.narrow(0, 0, rows);
    const at::Tensor hidden_rows = hidden.narrow(0, start, rows);
    gemms.logits(block, hidden_rows);
    acc_t* z = block.data_ptr<acc_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t token = start + r;
        acc_t* row = z + r * V;
        if (cap > 0) softcap_row(row, V, cap);
        gemms.write_coefficients(row, r, cap, target_ptr[token], lse_ptr[token], grad_ptr[token]);
      }
    });
    if (grad_hidden.defined()) {
      at::Tensor grad_hidden_rows = grad_hidden.narrow(0, start, rows);
      gemms.coefficients_times_head(grad_hidden_rows, block);
    }
    gemms.add_head_gradients(grad_weight, grad_bias, block, hidden_rows);
  }
}

}  // namespace

std::vector<at::Tensor> token_logprobs_forward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double softcap, bool with_jacobian, bool with_head_grads,
    int64_t block_rows, bool bf16_gemm) {
  check_internal_inputs(hidden, weight, targets, block_rows);
  const at::ScalarType acc = accumulation_type(hidden);
  const at::Tensor targets_c = targets.contiguous();
  const int64_t N = hidden.size(0);
  const auto options = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({N}, options);
  at::Tensor lse = at::empty({N}, options);
  at::Tensor jacobian = with_jacobian ? at::empty({N, weight.size(1)}, options) : at::Tensor();
  at::Tensor grad_weight = with_head_grads ? at::zeros(weight.sizes(), options) : at::Tensor();
  at::Tensor grad_bias =
      with_head_grads && bias.has_value() ? at::zeros({weight.size(0)}, options) : at::Tensor();
  if (N == 0) return {logp, lse, jacobian, grad_weight, grad_bias};
  const bool coefficients = with_jacobian || with_head_grads;
  const HeadGemms gemms(weight, bias, acc, bf16_gemm, with_jacobian,
                        coefficients ? std::min(block_rows, N) : 0, grad_bias.defined());
  if (acc == at::kDouble) {
    forward_impl<double>(hidden, gemms, weight.size(0), targets_c, softcap, block_rows, logp, lse,
                         jacobian, grad_weight, grad_bias);
  } else {
    forward_impl<float>(hidden, gemms, weight.size(0), targets_c, static_cast<float>(softcap),
                        block_rows, logp, lse, jacobian, grad_weight, grad_bias);
  }
  return {logp, lse, jacobian, grad_weight, grad_bias};
}

std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& grad_logp, double softcap,
    bool need_hidden, bool need_weight, bool need_bias, int64_t block_rows, bool bf16_gemm) {
  check_internal_inputs(hidden, weight, targets, block_rows);
  const at::ScalarType acc = accumulation_type(hidden);
  TORCH_CHECK(lse.scalar_type() == acc && grad_logp.scalar_type() == acc,
              "token_logprobs_cpu: lse and grad_logp must be in the accumulation dtype");
  const auto options = hidden.options().dtype(acc);
  const int64_t N = hidden.size(0);
  at::Tensor grad_hidden = need_hidden ? at::empty({N, weight.size(1)}, options) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), options) : at::Tensor();
  at::Tensor grad_bias = need_bias ? at::zeros({weight.size(0)}, options) : at::Tensor();
  if (N == 0) return {grad_hidden, grad_weight, grad_bias};
  const at::Tensor targets_c = targets.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_c = grad_logp.contiguous();
  const HeadGemms gemms(weight, bias, acc, bf16_gemm, need_hidden, std::min(block_rows, N),
                        need_bias);
  if (acc == at::kDouble) {
    backward_impl<double>(hidden, gemms, weight.size(0), targets_c, lse_c, grad_c, softcap,
                          block_rows, grad_hidden, grad_weight, grad_bias);
  } else {
    backward_impl<float>(hidden, gemms, weight.size(0), targets_c, lse_c, grad_c,
                         static_cast<float>(softcap), block_rows, grad_hidden, grad_weight,
                         grad_bias);
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace autoregembed_fast
