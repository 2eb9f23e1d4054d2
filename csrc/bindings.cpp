// Python bindings of autoregembed_fast._C.
#include <torch/extension.h>

#include "bf16_gemm_cpu.h"
#include "token_logprobs.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ backends of autoregembed_fast (import torch first).";
  m.def("token_logprobs_forward_cpu", &autoregembed_fast::token_logprobs_forward_cpu,
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("targets"), pybind11::arg("softcap"), pybind11::arg("with_jacobian"),
        pybind11::arg("with_head_grads"), pybind11::arg("block_rows"), pybind11::arg("bf16_gemm"));
  m.def("token_logprobs_backward_cpu", &autoregembed_fast::token_logprobs_backward_cpu,
        pybind11::arg("hidden"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("targets"), pybind11::arg("lse"), pybind11::arg("grad_logp"),
        pybind11::arg("softcap"), pybind11::arg("need_hidden"), pybind11::arg("need_weight"),
        pybind11::arg("need_bias"), pybind11::arg("block_rows"), pybind11::arg("bf16_gemm"));
  m.def("cpu_has_avx512_bf16", &autoregembed_fast::cpu_has_avx512_bf16);
  m.def("cpu_has_amx_bf16", &autoregembed_fast::cpu_has_amx_bf16);
  m.def("bf16_matmul_cpu", &autoregembed_fast::bf16_matmul_cpu, pybind11::arg("a"), pybind11::arg("b"));
#ifdef AEF_WITH_CUDA
  m.def("online_softmax_chunk_cuda", &autoregembed_fast::online_softmax_chunk_cuda,
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("col_offset"),
        pybind11::arg("softcap"), pybind11::arg("running_max"), pybind11::arg("running_sumexp"),
        pybind11::arg("target_logit"), pybind11::arg("weights"), pybind11::arg("alpha"));
  m.def("grad_coefficients_chunk_cuda", &autoregembed_fast::grad_coefficients_chunk_cuda,
        pybind11::arg("logits"), pybind11::arg("targets"), pybind11::arg("col_offset"),
        pybind11::arg("softcap"), pybind11::arg("lse"), pybind11::arg("grad"),
        pybind11::arg("coeff"));
#endif
}
