// Torch glue of the CUDA epilogue kernel (built only when the installed torch has CUDA).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "logits_epilogue_cuda.h"
#include "token_logprobs.h"

namespace autoregembed_fast {
namespace {

CoeffType coeff_type_of(const c10::optional<at::Tensor>& coeff) {
  if (!coeff.has_value()) return CoeffType::kNone;
  switch (coeff->scalar_type()) {
    case at::kFloat: return CoeffType::kFloat32;
    case at::kBFloat16: return CoeffType::kBFloat16;
    case at::kHalf: return CoeffType::kFloat16;
    default: TORCH_CHECK(false, "logits_epilogue_cuda: coeff must be float32, bfloat16 or float16");
  }
}

void check_vector(const c10::optional<at::Tensor>& t, int64_t rows, at::ScalarType dtype,
                  const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == rows &&
                  t->is_contiguous(),
              "logits_epilogue_cuda: ", name, " must be a contiguous CUDA vector of ", rows, " ",
              dtype);
}

}  // namespace

void logits_epilogue_cuda(
    const at::Tensor& logits, const c10::optional<at::Tensor>& coeff, const at::Tensor& targets,
    const at::Tensor& lse, const c10::optional<at::Tensor>& target_logit,
    const c10::optional<at::Tensor>& grad, double softcap, bool compute_lse) {
  TORCH_CHECK(logits.is_cuda() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.stride(1) == 1,
              "logits_epilogue_cuda: logits must be a 2-D float32 CUDA tensor with unit column stride");
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  if (coeff.has_value()) {
    TORCH_CHECK(coeff->is_cuda() && coeff->dim() == 2 && coeff->size(0) == rows &&
                    coeff->size(1) == vocab && coeff->stride(1) == 1,
                "logits_epilogue_cuda: coeff must match logits' shape with unit column stride");
  }
  check_vector(targets, rows, at::kLong, "targets");
  check_vector(lse, rows, at::kFloat, "lse");
  check_vector(target_logit, rows, at::kFloat, "target_logit");
  check_vector(grad, rows, at::kFloat, "grad");
  TORCH_CHECK(!compute_lse || target_logit.has_value(),
              "logits_epilogue_cuda: compute_lse needs a target_logit output");
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaError_t status = launch_logits_epilogue(
      logits.data_ptr<float>(), rows, vocab, logits.stride(0),
      coeff.has_value() ? coeff->data_ptr() : nullptr, coeff_type_of(coeff),
      coeff.has_value() ? coeff->stride(0) : 0, targets.data_ptr<int64_t>(),
      lse.data_ptr<float>(), target_logit.has_value() ? target_logit->data_ptr<float>() : nullptr,
      grad.has_value() ? grad->data_ptr<float>() : nullptr, static_cast<float>(softcap),
      compute_lse, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "logits_epilogue_cuda: ", cudaGetErrorString(status));
}

}  // namespace autoregembed_fast
