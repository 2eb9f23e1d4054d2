// Torch glue of the CUDA epilogue kernels (built only when the installed torch has CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "logits_epilogue_cuda.h"
#include "token_logprobs.h"

namespace autoregembed_fast {
namespace {

FloatType float_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

void check_chunk(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "logits must be a 2-D float32 CUDA tensor with unit column stride");
}

void check_like_chunk(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(0) == logits.size(0) &&
                  t.size(1) == logits.size(1) && t.stride(1) == 1,
              name, " must match logits' shape with unit column stride");
}

void check_row_vector(const at::Tensor& t, int64_t rows, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == rows &&
                  t.is_contiguous(),
              name, " must be a contiguous CUDA vector of ", rows, " ", dtype);
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": ", cudaGetErrorString(status));
}

}  // namespace

void online_softmax_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& targets, int64_t col_offset, double softcap,
    const at::Tensor& running_max, const at::Tensor& running_sumexp, const at::Tensor& target_logit,
    const c10::optional<at::Tensor>& weights, const c10::optional<at::Tensor>& alpha) {
  check_chunk(logits);
  const int64_t rows = logits.size(0);
  check_row_vector(targets, rows, at::kLong, "targets");
  check_row_vector(running_max, rows, at::kFloat, "running_max");
  check_row_vector(running_sumexp, rows, at::kFloat, "running_sumexp");
  check_row_vector(target_logit, rows, at::kFloat, "target_logit");
  TORCH_CHECK(weights.has_value() == alpha.has_value(), "weights and alpha come together");
  if (weights.has_value()) {
    check_like_chunk(*weights, logits, "weights");
    check_row_vector(*alpha, rows, at::kFloat, "alpha");
  }
  const c10::cuda::CUDAGuard device_guard(logits.device());
  check_launch(
      launch_online_softmax_chunk(
          logits.data_ptr<float>(), rows, logits.size(1), col_offset, logits.stride(0),
          weights.has_value() ? weights->data_ptr() : nullptr,
          weights.has_value() ? float_type_of(*weights, "weights") : FloatType::kFloat32,
          weights.has_value() ? weights->stride(0) : 0,
          alpha.has_value() ? alpha->data_ptr<float>() : nullptr, targets.data_ptr<int64_t>(),
          running_max.data_ptr<float>(), running_sumexp.data_ptr<float>(),
          target_logit.data_ptr<float>(), static_cast<float>(softcap),
          c10::cuda::getCurrentCUDAStream()),
      "online_softmax_chunk_cuda");
}

void grad_coefficients_chunk_cuda(
    const at::Tensor& logits, const at::Tensor& targets, int64_t col_offset, double softcap,
    const at::Tensor& lse, const at::Tensor& grad, const at::Tensor& coeff) {
  check_chunk(logits);
  const int64_t rows = logits.size(0);
  check_row_vector(targets, rows, at::kLong, "targets");
  check_row_vector(lse, rows, at::kFloat, "lse");
  check_row_vector(grad, rows, at::kFloat, "grad");
  check_like_chunk(coeff, logits, "coeff");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  check_launch(
      launch_grad_coefficients_chunk(
          logits.data_ptr<float>(), rows, logits.size(1), col_offset, logits.stride(0),
          coeff.data_ptr(), float_type_of(coeff, "coeff"), coeff.stride(0),
          targets.data_ptr<int64_t>(), lse.data_ptr<float>(), grad.data_ptr<float>(),
          static_cast<float>(softcap), c10::cuda::getCurrentCUDAStream()),
      "grad_coefficients_chunk_cuda");
}

}  // namespace autoregembed_fast
