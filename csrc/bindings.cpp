// Python bindings of autoregembed_fast._C.
#include <torch/extension.h>

#include "bf16_gemm_cpu.h"
#include "token_logprobs.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ backends of autoregembed_fast (import torch first).";
  namespace py = pybind11;
  using autoregembed_fast::Gradients;
  using autoregembed_fast::SweepOptions;
  py::class_<Gradients>(m, "Gradients", "Which gradients a token_logprobs call forms.")
      .def(py::init([](bool hidden, bool weight, bool bias) { return Gradients{hidden, weight, bias}; }),
           py::kw_only(), py::arg("hidden") = false, py::arg("weight") = false,
           py::arg("bias") = false)
      .def_readonly("hidden", &Gradients::hidden)
      .def_readonly("weight", &Gradients::weight)
      .def_readonly("bias", &Gradients::bias);
  py::class_<SweepOptions>(m, "SweepOptions", "How a token_logprobs call sweeps the vocabulary.")
      .def(py::init([](double softcap, int64_t block_rows, bool bf16_gemm) {
             return SweepOptions{softcap, block_rows, bf16_gemm};
           }),
           py::kw_only(), py::arg("softcap"), py::arg("block_rows"), py::arg("bf16_gemm"))
      .def_readonly("softcap", &SweepOptions::softcap)
      .def_readonly("block_rows", &SweepOptions::block_rows)
      .def_readonly("bf16_gemm", &SweepOptions::bf16_gemm);
  m.def("token_logprobs_forward_cpu", &autoregembed_fast::token_logprobs_forward_cpu,
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
        py::arg("gradients"), py::arg("options"));
  m.def("token_logprobs_backward_cpu", &autoregembed_fast::token_logprobs_backward_cpu,
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("lse"),
        py::arg("grad_logp"), py::arg("gradients"), py::arg("options"));
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
