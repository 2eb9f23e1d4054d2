// CPU backend of token_logprobs: chunked GEMM through ATen's BLAS plus one fused epilogue per block.
//
// For a block of C tokens the logits Z = H_c W^T (+ b) go into one reused C x V buffer; each row is
// then capped, reduced to its log-sum-exp and, when a gradient is wanted, overwritten in place by the
// gradient coefficients G (see row_epilogue.h), so that the second GEMM G @ W gives the rows of
// d log p / d hidden directly. Memory is one C x V block, never N x V.
//
// Accumulation type: float64 inputs are computed in float64 (so gradcheck is meaningful), every other
// dtype in float32. bf16 inputs on a CPU with AVX512-BF16 (when the caller asks, `bf16_gemm`) keep
// their dtype in the GEMMs, which still accumulate and output in fp32 (bf16_gemm_cpu.h); elsewhere
// they are upcast to fp32 once per call. The float row routines are compiled for AVX-512, AVX2 and baseline x86 and picked
// at load time (target_clones), so the extension stays portable while using the wide vectors here.
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

namespace autoregembed_fast {
namespace {

template <typename acc_t>
__attribute__((always_inline)) inline void forward_row(
    acc_t* z, int64_t V, acc_t cap, int64_t target, bool with_jacobian, acc_t* lse_out,
    acc_t* logp_out) {
  if (cap > 0) apply_softcap(z, V, cap);
  const acc_t lse = logsumexp(z, V);
  *lse_out = lse;
  *logp_out = z[target] - lse;
  if (with_jacobian) logprob_grad_coefficients(z, V, cap, target, lse, acc_t(1));
}

template <typename acc_t>
__attribute__((always_inline)) inline void backward_row(
    acc_t* z, int64_t V, acc_t cap, int64_t target, acc_t lse, acc_t grad) {
  if (cap > 0) apply_softcap(z, V, cap);
  logprob_grad_coefficients(z, V, cap, target, lse, grad);
}

AEF_CPU_CLONES void forward_row_dispatch(
    float* z, int64_t V, float cap, int64_t target, bool with_jacobian, float* lse_out,
    float* logp_out) {
  forward_row(z, V, cap, target, with_jacobian, lse_out, logp_out);
}

void forward_row_dispatch(
    double* z, int64_t V, double cap, int64_t target, bool with_jacobian, double* lse_out,
    double* logp_out) {
  forward_row(z, V, cap, target, with_jacobian, lse_out, logp_out);
}

AEF_CPU_CLONES void backward_row_dispatch(
    float* z, int64_t V, float cap, int64_t target, float lse, float grad) {
  backward_row(z, V, cap, target, lse, grad);
}

void backward_row_dispatch(double* z, int64_t V, double cap, int64_t target, double lse, double grad) {
  backward_row(z, V, cap, target, lse, grad);
}

at::ScalarType accumulation_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The GEMMs of a block: ATen's in the accumulation dtype on the upcast head, or, for bf16 inputs on an
// AVX512-BF16 CPU, bf16_gemm on the bf16 head packed once per call (two packed copies: no fp32 copy).
class HeadGemms {
 public:
  HeadGemms(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::ScalarType acc,
            bool bf16, bool coefficient_gemm)
      : bf16_(bf16) {
    if (bias.has_value()) bias_acc_ = bias->to(acc).contiguous();
    if (!bf16_) {
      weight_acc_ = weight.to(acc).contiguous();
      return;
    }
    TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16(),
                "token_logprobs_cpu: bf16_gemm needs bf16 inputs and a CPU with AVX512-BF16");
    packed_for_logits_ = pack_bf16_right_operand(weight.t());
    if (coefficient_gemm) packed_for_coefficients_ = pack_bf16_right_operand(weight);
    vocab_ = weight.size(0);
    hidden_size_ = weight.size(1);
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

  // out [rows, d] <- block @ W: the Jacobian rows (or dH) from the gradient coefficients in block.
  void coefficients_times_head(at::Tensor& out, const at::Tensor& block) const {
    if (!bf16_) {
      at::mm_out(out, block, weight_acc_);
      return;
    }
    // The coefficients round to bf16 here, as in eager bf16 autograd; the sum stays fp32. One buffer
    // for every block of the call (a fresh one per block cost ~30 ms of page faults each at 64 MiB).
    const int64_t rows = block.size(0), width = vocab_ + vocab_ % 2;
    if (!coefficients_bf16_.defined() || coefficients_bf16_.size(0) < rows) {
      coefficients_bf16_ = at::zeros({rows, width}, block.options().dtype(at::kBFloat16));
    }
    coefficients_bf16_.narrow(0, 0, rows).narrow(1, 0, vocab_).copy_(block);
    bf16_gemm(coefficients_bf16_.data_ptr<at::BFloat16>(), width, packed_for_coefficients_, rows,
              hidden_size_, width, out.data_ptr<float>(), hidden_size_, false, nullptr);
  }

  // grad_weight += block^T @ hidden_rows, grad_bias += column sums of block.
  void add_head_gradients(at::Tensor& grad_weight, at::Tensor& grad_bias, const at::Tensor& block,
                          const at::Tensor& hidden_rows) const {
    if (grad_bias.defined()) grad_bias.add_(block.sum(0));
    if (!grad_weight.defined()) return;
    if (!bf16_) {
      grad_weight.addmm_(block.t(), hidden_rows.to(block.scalar_type()));
      return;
    }
    // The coefficients round to bf16 as for G @ W, here transposed (G^T [V, rows] is the left
    // operand), and the hidden rows [rows, d] are packed as the right one; the sum stays fp32. The
    // transposed buffer is sized by the first (largest) block and serves the call's every block.
    const int64_t rows = block.size(0), width = rows + rows % 2;
    if (!transposed_coefficients_bf16_.defined()) {
      transposed_coefficients_bf16_ = at::empty({vocab_, width}, block.options().dtype(at::kBFloat16));
    }
    const int64_t ld = transposed_coefficients_bf16_.size(1);
    at::BFloat16* transposed = transposed_coefficients_bf16_.data_ptr<at::BFloat16>();
    transpose_to_bf16(block.data_ptr<float>(), rows, vocab_, vocab_, transposed, ld);
    bf16_gemm(transposed, ld, pack_bf16_right_operand(hidden_rows), vocab_, hidden_size_, width,
              grad_weight.data_ptr<float>(), hidden_size_, true, nullptr);
  }

 private:
  // A contiguous bf16 matrix with an even number of columns (a zero column appended to an odd one).
  static at::Tensor even_width(const at::Tensor& rows) {
    return rows.size(1) % 2 ? at::constant_pad_nd(rows, {0, 1}) : rows.contiguous();
  }

  bool bf16_;
  at::Tensor weight_acc_;
  c10::optional<at::Tensor> bias_acc_;
  at::Tensor packed_for_logits_, packed_for_coefficients_;
  mutable at::Tensor coefficients_bf16_;  // [block rows, V rounded up to even], the pad column 0
  mutable at::Tensor transposed_coefficients_bf16_;  // [V, block rows rounded up to even]
  int64_t vocab_ = 0, hidden_size_ = 0;
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
  // Each row's gradient coefficients d log p / d logits are written over its logits when any gradient
  // is formed here: the Jacobian (G @ W) and the head's gradients of sum(log p) (G^T @ H, sum of G).
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
        forward_row_dispatch(z + r * V, V, cap, target_ptr[token], coefficients, lse_ptr + token,
                             logp_ptr + token);
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
        backward_row_dispatch(z + r * V, V, cap, target_ptr[token], lse_ptr[token], grad_ptr[token]);
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
  const HeadGemms gemms(weight, bias, acc, bf16_gemm, with_jacobian);
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
  const HeadGemms gemms(weight, bias, acc, bf16_gemm, need_hidden);
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
