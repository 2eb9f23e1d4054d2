"""The CPU backend's bf16 GEMM (csrc/bf16_gemm_cpu.cpp, AVX512-BF16) against float64 on the rounded
inputs, alone and inside the op (forced on and off through AUTOREGEMBED_CPU_BF16_GEMM)."""

import math
from pathlib import Path

import pytest
import torch

from autoregembed_fast import _C, token_logprobs
from autoregembed_fast import backends
from oracle import oracle_grads, rounding_bounds, token_logprobs_oracle

needs_avx512_bf16 = pytest.mark.skipif(
    not _C.cpu_has_avx512_bf16(), reason="this CPU has no AVX512-BF16 (lscpu flag avx512_bf16): "
    "bf16 inputs are upcast to fp32 here, as tests/test_ops.py checks")


def fp32_accumulation_bound(a, b):
    """|fp32 sum of K exact products - exact| <= K * 2^-24 * sum |a_k b_k| (plus one rounding)."""
    return (a.double().abs() @ b.double().abs()) * (a.shape[1] + 1) * 2.0**-24


# (M, K, N): one element; K odd (a zero column is appended); N and M past the 64-column and 6-row
# register tiles and the row tasks (up to 192 rows); K past one 256-value cache block; a left operand past 8 MiB
# (tasks then walk every column group per cache block, as for the Jacobian, K = V), with rows for
# every thread and with two register tiles (one partial).
SHAPES = [(1, 1, 1), (7, 13, 251), (37, 600, 1003), (5, 601, 70), (197, 576, 193), (13, 2101, 70),
          (200, 2100, 130), (200, 24000, 130), (9, 500000, 70)]


@needs_avx512_bf16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "b-transposed", "strided", "offset"])
def test_bf16_matmul_is_fp32_accurate_on_the_rounded_inputs(shape, layout):
    M, K, N = shape
    a = torch.randn(M, K).bfloat16()
    if layout == "contiguous":
        b = torch.randn(K, N).bfloat16()
    elif layout == "b-transposed":  # the head W [V, d] read as W^T
        b = torch.randn(N, K).bfloat16().t()
    elif layout == "strided":
        a = torch.randn(M, 2 * K).bfloat16()[:, ::2]
        b = torch.randn(K, 3 * N).bfloat16()[:, ::3]
    else:
        a = torch.randn(M + 1, K).bfloat16()[1:]
        b = torch.randn(K * N + 5).bfloat16()[5:].view(K, N)
    out = _C.bf16_matmul_cpu(a, b)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs() <= fp32_accumulation_bound(a, b)).all()


@needs_avx512_bf16
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(37, 600, 1003), (200, 24000, 130)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bf16_matmul_splits_its_work_right_for_any_thread_count(threads, shape):
    """The tasks (row ranges, column groups) depend on the thread count: 1 and 3 threads as well as
    the machine's, for a left operand below and above 8 MiB."""
    M, K, N = shape
    a, b = torch.randn(M, K).bfloat16(), torch.randn(K, N).bfloat16()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _C.bf16_matmul_cpu(a, b)
    finally:
        torch.set_num_threads(before)
    exact = a.double() @ b.double()
    assert ((out.double() - exact).abs() <= fp32_accumulation_bound(a, b)).all()


@needs_avx512_bf16
def test_bf16_matmul_of_an_empty_product_is_zero():
    assert torch.equal(_C.bf16_matmul_cpu(torch.ones(3, 0).bfloat16(), torch.ones(0, 4).bfloat16()),
                       torch.zeros(3, 4))


# (d, V) of the op tests: even, odd, and a V spanning three of the epilogue's 1,024-logit slices.
OP_SHAPES = [(600, 1002), (601, 1003), (64, 2085)]
OP_SHAPE_IDS = ["even", "odd", "V-past-two-epilogue-slices"]


@pytest.fixture
def bf16_gemm_setting(monkeypatch):
    def use(setting):
        monkeypatch.setenv(backends.CPU_BF16_GEMM_ENV, setting)
        backends.cpu_bf16_gemm.cache_clear()

    yield use
    backends.cpu_bf16_gemm.cache_clear()


def use_block_rows(monkeypatch, block_rows, V):
    """Blocks of `block_rows` tokens (None: the package's budgets) on both CPU paths."""
    if block_rows:
        for budget in ("CPU_LOGITS_BLOCK_BYTES", "CPU_BF16_LOGITS_BLOCK_BYTES"):
            monkeypatch.setattr(backends, budget, block_rows * V * 4)


def draw_bf16_problem(seed, N, d, V, with_bias):
    torch.manual_seed(seed)
    hidden = torch.randn(N, d).bfloat16()
    weight = (torch.randn(V, d) * (3.0 / math.sqrt(d))).bfloat16()
    bias = torch.randn(V).bfloat16() if with_bias else None
    return hidden, weight, bias, torch.randint(0, V, (N,))


@needs_avx512_bf16
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("d, V", OP_SHAPES, ids=OP_SHAPE_IDS)
@pytest.mark.parametrize("block_rows", [5, None], ids=["5-row-blocks", "one-block"])
def test_op_with_bf16_gemms_matches_the_oracle(bf16_gemm_setting, monkeypatch, with_bias, softcap, d,
                                               V, block_rows):
    """fp32 logits (log p to fp32 accuracy on the rounded inputs); the Jacobian within the bound of
    rounding its coefficients to bf16 (`oracle.rounding_bounds`); and the bf16 GEMMs are really in use: the
    Jacobian carries the rounding of its coefficients to bf16, which the upcast path does not. 37
    tokens in blocks of 5 end with a smaller block (buffers reused across blocks); V = 2085 spans
    three of the epilogue's 1,024-logit slices (targets in each)."""
    use_block_rows(monkeypatch, block_rows, V)
    N = 37
    hidden, weight, bias, targets = draw_bf16_problem(0, N, d, V, with_bias)
    truth = token_logprobs_oracle(hidden, weight, targets, bias, softcap=softcap)
    truth_jacobian, _, _ = oracle_grads(hidden, weight, targets, torch.ones(N), bias, softcap=softcap)
    bound = rounding_bounds(hidden, weight, targets, torch.ones(N), UNIT, bias, softcap=softcap)[0]
    jacobian_errors = {}
    for setting in ("1", "0"):
        bf16_gemm_setting(setting)
        assert backends.cpu_bf16_gemm() == (setting == "1")
        x = hidden.clone().requires_grad_()
        logp = token_logprobs(x, weight, targets, bias=bias, softcap=softcap, backend="cpu")
        assert logp.dtype == torch.float32
        assert (logp.double() - truth).abs().max() <= 1e-5 * max(1.0, truth.abs().max().item())
        logp.sum().backward()
        # The op returns the Jacobian in bf16: one more rounding, of the result.
        assert_within(x.grad, truth_jacobian, bound + UNIT * truth_jacobian.abs())
        # The backend's fp32 Jacobian, before the op rounds it to the input dtype.
        _, _, jacobian = backends.CpuBackend().forward(hidden, weight, bias, targets, softcap, True)
        jacobian_errors[setting] = (jacobian.double() - truth_jacobian).abs().max().item()
        assert_within(jacobian, truth_jacobian, bound)
    # Only the bf16 GEMM rounds the coefficients (to bf16); the upcast path is fp32 throughout.
    assert jacobian_errors["1"] > 10 * jacobian_errors["0"]


@needs_avx512_bf16
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("d, V", OP_SHAPES, ids=OP_SHAPE_IDS)
@pytest.mark.parametrize("block_rows", [5, 32, None],
                         ids=["5-row-blocks", "32-row-blocks", "one-block"])
def test_head_gradients_with_bf16_gemms_match_the_oracle(bf16_gemm_setting, monkeypatch, with_bias,
                                                         softcap, d, V, block_rows):
    """A trainable head's gradients (G^T @ H from the transposed coefficients rounded to bf16, and
    the column sums of G), by the recompute backward (any upstream gradient) and by the one-sweep
    route of scalar losses: within the bound of rounding G to bf16 (`oracle.rounding_bounds`), and
    the bf16 GEMM is
    really in use (the upcast path does not round G). 37 tokens: blocks of 5 (odd K, padded) end with
    2 rows; blocks of 32 fill one 32-row tile of the vectorised transpose, then 5 rows by value; one
    block of 37: a tile and 5 rows by value. V = 1002 / 1003 leave columns past the 16-column tiles;
    V = 2085 spans three of the epilogue's 1,024-logit slices."""
    use_block_rows(monkeypatch, block_rows, V)
    N = 37
    hidden, weight, bias, targets = draw_bf16_problem(1, N, d, V, with_bias)
    grad_logp = torch.randn(N)
    _, truth_weight, truth_bias = oracle_grads(hidden, weight, targets, grad_logp, bias,
                                               softcap=softcap)
    _, truth_summed, _ = oracle_grads(hidden, weight, targets, torch.ones(N), bias, softcap=softcap)
    bound = rounding_bounds(hidden, weight, targets, grad_logp, UNIT, bias, softcap=softcap)[1]
    summed_bound = rounding_bounds(hidden, weight, targets, torch.ones(N), UNIT, bias,
                                   softcap=softcap)[1]
    backend = backends.CpuBackend()
    errors = {}
    for setting in ("1", "0"):
        bf16_gemm_setting(setting)
        _, lse, _ = backend.forward(hidden, weight, bias, targets, softcap, False)
        _, grad_weight, grad_bias = backend.backward(hidden, weight, bias, targets, lse, grad_logp,
                                                     softcap, False, True, with_bias)
        assert grad_weight.dtype == torch.float32
        errors[setting] = (grad_weight.double() - truth_weight).abs().max().item()
        assert_within(grad_weight, truth_weight, bound)
        if with_bias:
            assert (grad_bias.double() - truth_bias).abs().max() <= 1e-5 * truth_bias.abs().max()
        _, _, summed, _ = backend.summed_grads(hidden, weight, bias, targets, softcap, False, True)
        assert_within(summed, truth_summed, summed_bound)
    assert errors["1"] > 10 * errors["0"]


# The kernel rounds fp32 coefficients to bf16 to nearest (vcvtne2ps2bf16): relative error <= eps / 2.
UNIT = torch.finfo(torch.bfloat16).eps / 2


def assert_within(actual, truth, bound):
    """Each element within its bound (float64) + fp32 accumulation's share of the gradient's scale."""
    slack = 1e-5 * truth.abs().max().item() + 1e-6
    excess = (actual.double() - truth).abs() - bound - slack
    assert excess.max().item() <= 0, f"over the bound by {excess.max().item():.3g}"


def test_a_bad_setting_names_itself(bf16_gemm_setting):
    bf16_gemm_setting("yes")
    with pytest.raises(ValueError, match="must be"):
        backends.cpu_bf16_gemm()


@pytest.mark.skipif(_C.cpu_has_avx512_bf16(), reason="this CPU has AVX512-BF16")
def test_insisting_on_bf16_gemms_without_avx512_bf16_is_an_error(bf16_gemm_setting):
    bf16_gemm_setting("1")
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        backends.cpu_bf16_gemm()


def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags():
    """The extension's one CPU detector against what Linux reports (/proc/cpuinfo's flags)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    flags = set(line.partition(":")[2].split())
    assert backends.cpu_native_bf16() == [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
