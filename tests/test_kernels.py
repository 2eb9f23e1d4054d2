"""The GPU kernels, verified without a GPU: Triton kernels under the interpreter against the float64
oracle, ahead-of-time compilation of every Triton kernel for Ampere and Hopper, nvcc compilation of the
CUDA sources, and the chunked route's driver (the CUDA backend's) run with the Triton epilogue."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from autoregembed_fast import backends
from autoregembed_fast.kernels import INTERPRETING
from oracle import oracle_grads, token_logprobs_oracle

triton = pytest.importorskip("triton")

from autoregembed_fast.kernels import logits_backward, logits_epilogue, lse_forward  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# The kernel-level tests below run on CPU tensors, so only under the interpreter; on a GPU machine the
# same kernels are covered through tests/test_ops.py with `TRITON_INTERPRET=0`.
needs_interpreter = pytest.mark.skipif(not INTERPRETING,
                                       reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")


def random_problem(n_tokens, dim, vocab, dtype=torch.float32, with_bias=True):
    hidden = torch.randn(n_tokens, dim).to(dtype)
    weight = (torch.randn(vocab, dim) * (2.0 / dim**0.5)).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n_tokens,))
    return hidden, weight, bias, targets


def oracle_lse(hidden, weight, bias, softcap):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.logsumexp(logits, dim=-1), logits


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3, 8], ids=["1-split", "3-splits", "empty-splits"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap4"])
def test_lse_forward_splits(num_splits, softcap):
    # V = 300 is 5 tiles of 64 (the last one partial): 8 splits leave some splits empty.
    hidden, weight, bias, targets = random_problem(45, 40, 300)
    lse, target_logit = lse_forward.lse_forward(hidden, weight, bias, targets, softcap, num_splits)
    expected_lse, logits = oracle_lse(hidden, weight, bias, softcap)
    assert (lse.double() - expected_lse).abs().max() <= 1e-5 * expected_lse.abs().max()
    expected_target = logits.gather(1, targets[:, None])[:, 0]
    assert (target_logit.double() - expected_target).abs().max() <= 1e-5 * expected_target.abs().max()


def capped_logits(hidden, weight, bias, softcap):
    return oracle_lse(hidden, weight, bias, softcap)[1]


@needs_interpreter
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=["in-place-fp32", "bf16-buffer"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap4"])
def test_online_softmax_chunk_step(weights_dtype, softcap):
    """One step from a non-trivial running state: columns [300, 1300) of a V = 1600 row, 4 tiles of the
    interpreter's BLOCK_V (the last partial); some targets fall inside the chunk, some outside."""
    hidden, weight, _, targets = random_problem(9, 16, 1600, with_bias=False)
    targets[:4] = torch.tensor([300, 777, 1299, 1300])
    capped = capped_logits(hidden, weight, None, softcap)
    columns = slice(300, 1300)
    old_max = capped[:, :300].max(dim=1).values
    old_sumexp = torch.exp(capped[:, :300] - old_max[:, None]).sum(dim=1)
    running_max, running_sumexp = old_max.float(), old_sumexp.float()
    target_logit = torch.full((9,), 0.5)
    logits = (hidden @ weight[columns].t()).contiguous()
    weights = logits if weights_dtype == torch.float32 else torch.empty_like(logits, dtype=weights_dtype)
    alpha = torch.empty(9)
    logits_epilogue.online_softmax_chunk(logits, targets, 300, softcap, running_max, running_sumexp,
                                         target_logit, weights, alpha)

    chunk = capped[:, columns]
    new_max = torch.maximum(old_max, chunk.max(dim=1).values)
    expected_alpha = torch.exp(old_max - new_max)
    expected_sumexp = old_sumexp * expected_alpha + torch.exp(chunk - new_max[:, None]).sum(dim=1)
    in_chunk = (targets >= 300) & (targets < 1300)
    picked = chunk.gather(1, (targets - 300).clamp(0, 999)[:, None])[:, 0]
    expected_target = 0.5 + torch.where(in_chunk, picked, torch.zeros_like(picked))
    slope = 1.0 if softcap is None else 1 - (chunk / softcap) ** 2
    expected_weights = torch.exp(chunk - new_max[:, None]) * slope
    expected_weights[in_chunk, (targets - 300)[in_chunk]] = 0.0  # the driver adds the target's term
    assert in_chunk[:3].all() and not in_chunk[3]
    assert torch.allclose(running_max.double(), new_max, rtol=1e-6)
    assert torch.allclose(alpha.double(), expected_alpha, rtol=1e-5)
    assert torch.allclose(running_sumexp.double(), expected_sumexp, rtol=1e-5)
    assert torch.allclose(target_logit.double(), expected_target, rtol=1e-5, atol=1e-5)
    tolerance = 1e-6 if weights_dtype == torch.float32 else 2 ** -8
    assert (weights.double() - expected_weights).abs().max() <= tolerance


@needs_interpreter
def test_grad_coefficients_chunk_uses_given_lse_grad_and_offset():
    hidden, weight, _, targets = random_problem(7, 16, 700, with_bias=False)
    targets[:2] = torch.tensor([100, 99])  # the first inside the chunk [100, 433), the second not
    expected_lse, capped = oracle_lse(hidden, weight, None, 3.0)
    raw = (hidden @ weight[100:433].t()).contiguous()
    grad = torch.randn(7)
    coeff = torch.empty_like(raw)
    logits_epilogue.grad_coefficients_chunk(raw, targets, 100, 3.0, expected_lse.float(), grad, coeff)
    chunk = capped[:, 100:433]
    onehot = torch.nn.functional.one_hot(targets, 700).double()[:, 100:433]
    expected = grad.double()[:, None] * (onehot - torch.exp(chunk - expected_lse[:, None])) * (
        1 - (chunk / 3.0) ** 2)
    assert (coeff.double() - expected).abs().max() <= 1e-5


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
def test_chunked_route_in_many_chunks(dtype, softcap):
    """The CUDA backend's driver (ChunkedRoute) with the Triton epilogues, tiled into 4 row blocks of
    5 tokens and vocabulary chunks of 35 columns (130 = 3 * 35 + 25)."""
    hidden, weight, bias, targets = random_problem(18, 24, 130, dtype)
    route = backends.ChunkedRoute(logits_epilogue, block_bytes=5 * 35 * 6, max_rows=5)
    assert route._tiles(18, weight, with_weights_buffer=dtype == torch.bfloat16) == (5, 35 if dtype == torch.bfloat16 else 52)
    logp, lse, jacobian = route.forward(hidden, weight, bias, targets, softcap, True)
    expected_logp = token_logprobs_oracle(hidden, weight, targets, bias, softcap=softcap)
    assert (logp.double() - expected_logp).abs().max() <= 1e-5 * expected_logp.abs().max()
    logp_no_grad, _, no_jacobian = route.forward(hidden, weight, bias, targets, softcap, False)
    assert no_jacobian is None and torch.allclose(logp_no_grad, logp, atol=1e-6)

    grad = torch.randn(18)
    expected = oracle_grads(hidden, weight, targets, grad, bias, softcap=softcap)
    # bf16 weights feed the second GEMM (as on tensor cores): bf16 relative rounding.
    rel = 1e-4 if dtype == torch.float32 else 2 ** -7
    jacobian_grad = grad[:, None] * jacobian
    assert (jacobian_grad.double() - expected[0]).abs().max() <= rel * expected[0].abs().max()
    got = route.backward(hidden, weight, bias, targets, lse, grad, softcap, True, True, True)
    for actual, want in zip(got, expected):
        assert (actual.double() - want).abs().max() <= rel * want.abs().max()


@needs_interpreter
@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (True, True, False)],
                         ids=["hidden", "weight+bias", "hidden+weight"])
def test_recompute_backward_selected_outputs(need):
    hidden, weight, bias, targets = random_problem(33, 20, 150)
    lse, _ = oracle_lse(hidden, weight, bias, None)
    grad = torch.randn(33)
    got = logits_backward.logits_backward(hidden, weight, bias, targets, lse.float(), grad, None, *need)
    expected = oracle_grads(hidden, weight, targets, grad, bias)
    for needed, actual, want in zip(need, got, expected):
        if needed:
            assert (actual.double() - want).abs().max() <= 1e-4 * want.abs().max()
        else:
            assert actual is None


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed).

def kernel_signatures():
    """(name, jit function, argument types, constexprs) of every Triton kernel, with bf16 operands
    and the GPU path (UPCAST off), so that the dot products must use tensor cores."""
    tile = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}
    lse_types = {
        "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "targets_ptr": "*i64",
        "split_max_ptr": "*fp32", "split_sumexp_ptr": "*fp32", "split_target_ptr": "*fp32",
        "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
        "softcap": "fp32", "num_splits": "i32",
    }
    backward_types = {
        "hidden_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "targets_ptr": "*i64",
        "lse_ptr": "*fp32", "grad_ptr": "*fp32", "grad_hidden_ptr": "*fp32",
        "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32",
        "stride_h": "i32", "stride_w": "i32", "softcap": "fp32",
    }
    online_types = {
        "logits_ptr": "*fp32", "weights_ptr": "*bf16", "alpha_ptr": "*fp32", "targets_ptr": "*i64",
        "running_max_ptr": "*fp32", "running_sumexp_ptr": "*fp32", "target_logit_ptr": "*fp32",
        "Vc": "i32", "col_offset": "i32", "stride_logits": "i32", "stride_weights": "i32",
        "softcap": "fp32",
    }
    coefficient_types = {
        "logits_ptr": "*fp32", "coeff_ptr": "*bf16", "targets_ptr": "*i64", "lse_ptr": "*fp32",
        "grad_ptr": "*fp32", "Vc": "i32", "col_offset": "i32", "stride_logits": "i32",
        "stride_coeff": "i32", "softcap": "fp32",
    }
    return [
        ("lse_forward", lse_forward._lse_forward_kernel, lse_types,
         {**tile, "HAS_BIAS": True, "HAS_SOFTCAP": True, "UPCAST": False}, True),
        ("logits_backward", logits_backward._logits_backward_kernel, backward_types,
         {**tile, "HAS_BIAS": True, "HAS_SOFTCAP": True, "HAS_GRAD": True, "NEED_HIDDEN": True,
          "NEED_WEIGHT": True, "NEED_BIAS": True, "UPCAST": False}, True),
        ("online_softmax_chunk", logits_epilogue._online_softmax_chunk_kernel, online_types,
         {"BLOCK_V": 2048, "HAS_SOFTCAP": True, "WRITE_WEIGHTS": True}, False),
        ("grad_coefficients_chunk", logits_epilogue._grad_coefficients_chunk_kernel,
         coefficient_types, {"BLOCK_V": 2048, "HAS_SOFTCAP": True}, False),
    ]


def compile_in_subprocess(name: str, capability: int) -> str:
    """Compiles one kernel for sm_<capability> in a process without TRITON_INTERPRET (the interpreter
    replaces the compiler); returns its PTX."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import test_kernels
print(test_kernels.aot_ptx({name!r}, {capability}))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def aot_ptx(name: str, capability: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel_name, kernel, types, constexprs, _ in kernel_signatures():
        if kernel_name == name:
            signature = {**types, **{key: "constexpr" for key in constexprs}}
            source = ASTSource(kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                      options={"num_warps": 8})
            assert compiled.asm["cubin"], "no cubin produced"
            return compiled.asm["ptx"]
    raise KeyError(name)


@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("name", [entry[0] for entry in kernel_signatures()])
def test_triton_kernels_compile_for_gpus(name, capability):
    ptx = compile_in_subprocess(name, capability)
    uses_dot = {entry[0]: entry[4] for entry in kernel_signatures()}[name]
    assert f".target sm_{capability}" in ptx
    if uses_dot:
        tensor_core_op = "wgmma" if capability == 90 else "mma.sync"
        assert tensor_core_op in ptx, f"{name} does not use tensor cores ({tensor_core_op}) on sm_{capability}"


# ---------------------------------------------------------------------------------------------------
# CUDA sources: compiled with nvcc for Ampere and Hopper (running them needs a GPU).

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")


@needs_nvcc
@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cuda_sources_compile(tmp_path, source, capability):
    done = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "-c", f"-gencode=arch=compute_{capability},code=sm_{capability}",
         "-I", str(CSRC), str(CSRC / source), "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def nvcc_toolkit_dir() -> Path:
    """The CUDA toolkit behind the nvcc on PATH (which may be a wrapper script), from `nvcc -v`."""
    done = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                          capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return Path(line.split("=", 1)[1]).parent
    return Path(NVCC).resolve().parent.parent


@needs_nvcc
def test_cuda_glue_compiles_against_torch_headers(tmp_path):
    """The torch glue of the CUDA backend, syntax-checked with the CUDA build's macro on: the CPU wheel
    lacks one generated header of the CUDA build (a configuration stub stands in for it)."""
    cuda_include = nvcc_toolkit_dir() / "include"
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    torch_include = Path(torch.__file__).parent / "include"
    for source in sorted(CSRC.glob("*_cuda.cpp")) + [CSRC / "bindings.cpp"]:
        done = subprocess.run(
            ["g++", "-std=c++17", "-fsyntax-only", "-DAEF_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
             "-I", str(CSRC), "-I", str(tmp_path), "-I", str(torch_include),
             "-I", str(torch_include / "torch" / "csrc" / "api" / "include"),
             "-I", str(cuda_include), "-I", sysconfig.get_paths()["include"], str(source)],
            capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{source.name}:\n{done.stderr[-3000:]}"
