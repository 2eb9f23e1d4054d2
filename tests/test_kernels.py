"""The GPU kernels: Triton kernels against the float64 oracle (under the interpreter on CPU tensors, or
compiled on CUDA tensors when a GPU is present), ahead-of-time compilation of every kernel and every
autotune config for Ampere and Hopper with a register-spill check, nvcc compilation of the CUDA
sources, and the chunked route's driver (the CUDA backend's) run with the Triton epilogue."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autoregembed_fast import backends
from autoregembed_fast.kernels import INTERPRETING
from oracle import oracle_grads, token_logprobs_oracle

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

import autoregembed_fast.kernels as kernels  # noqa: E402
from autoregembed_fast.kernels import (  # noqa: E402
    autotuning, logits_backward, logits_epilogue, lse_forward, tl_utils,
)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# Where the kernel-level tests run: CPU tensors under the interpreter (TRITON_INTERPRET=1, the default
# of conftest.py), CUDA tensors with the compiled kernels on a GPU machine (TRITON_INTERPRET=0).
if INTERPRETING:
    KERNEL_DEVICE = "cpu"
elif torch.cuda.is_available():
    KERNEL_DEVICE = "cuda"
else:
    KERNEL_DEVICE = None
needs_kernel_device = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="Triton kernels run under TRITON_INTERPRET=1 or on a CUDA GPU")


def random_problem(n_tokens, dim, vocab, dtype=torch.float32, with_bias=True):
    hidden = torch.randn(n_tokens, dim).to(KERNEL_DEVICE, dtype)
    weight = (torch.randn(vocab, dim) * (2.0 / dim**0.5)).to(KERNEL_DEVICE, dtype)
    bias = torch.randn(vocab).to(KERNEL_DEVICE, dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n_tokens,), device=KERNEL_DEVICE)
    return hidden, weight, bias, targets


def active_configs(module):
    """The autotune configs a kernel module launches with here (for every operand dtype)."""
    return module.INTERPRETER_CONFIGS if INTERPRETING else (
        module.GPU_CONFIGS_16BIT + module.GPU_CONFIGS_FP32)


def largest(module, name):
    return max(config.kwargs[name] for config in active_configs(module))


def oracle_lse(hidden, weight, bias, softcap):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.logsumexp(logits, dim=-1), logits


@needs_kernel_device
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


@needs_kernel_device
@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=["in-place-fp32", "bf16-buffer"])
@pytest.mark.parametrize("softcap", [None, 4.0], ids=["nocap", "cap4"])
def test_online_softmax_chunk_step(weights_dtype, softcap):
    """One step from a non-trivial running state: a chunk of 3.5 BLOCK_V columns starting at column
    300 (so the kernel's loops run 4 times, the last partial); some targets fall inside the chunk,
    some outside."""
    width = 3 * logits_epilogue._block_v() + logits_epilogue._block_v() // 2
    hidden, weight, _, targets = random_problem(9, 16, 300 + width + 300, with_bias=False)
    targets[:4] = torch.tensor([300, 777, 300 + width - 1, 300 + width], device=KERNEL_DEVICE)
    capped = capped_logits(hidden, weight, None, softcap)
    columns = slice(300, 300 + width)
    old_max = capped[:, :300].max(dim=1).values
    old_sumexp = torch.exp(capped[:, :300] - old_max[:, None]).sum(dim=1)
    running_max, running_sumexp = old_max.float(), old_sumexp.float()
    target_logit = torch.full((9,), 0.5, device=KERNEL_DEVICE)
    logits = (hidden @ weight[columns].t()).contiguous()
    weights = logits if weights_dtype == torch.float32 else torch.empty_like(logits, dtype=weights_dtype)
    alpha = torch.empty(9, device=KERNEL_DEVICE)
    logits_epilogue.online_softmax_chunk(logits, targets, 300, softcap, running_max, running_sumexp,
                                         target_logit, weights, alpha)

    chunk = capped[:, columns]
    new_max = torch.maximum(old_max, chunk.max(dim=1).values)
    expected_alpha = torch.exp(old_max - new_max)
    expected_sumexp = old_sumexp * expected_alpha + torch.exp(chunk - new_max[:, None]).sum(dim=1)
    in_chunk = (targets >= 300) & (targets < 300 + width)
    picked = chunk.gather(1, (targets - 300).clamp(0, width - 1)[:, None])[:, 0]
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


@needs_kernel_device
def test_grad_coefficients_chunk_uses_given_lse_grad_and_offset():
    width = 2 * logits_epilogue._block_v() + 77  # three passes of the kernel's loop
    hidden, weight, _, targets = random_problem(7, 16, 100 + width + 50, with_bias=False)
    targets[:2] = torch.tensor([100, 99], device=KERNEL_DEVICE)  # the first inside the chunk, the second not
    expected_lse, capped = oracle_lse(hidden, weight, None, 3.0)
    raw = (hidden @ weight[100:100 + width].t()).contiguous()
    grad = torch.randn(7, device=KERNEL_DEVICE)
    coeff = torch.empty_like(raw)
    logits_epilogue.grad_coefficients_chunk(raw, targets, 100, 3.0, expected_lse.float(), grad, coeff)
    chunk = capped[:, 100:100 + width]
    onehot = torch.nn.functional.one_hot(targets, weight.shape[0]).double()[:, 100:100 + width]
    expected = grad.double()[:, None] * (onehot - torch.exp(chunk - expected_lse[:, None])) * (
        1 - (chunk / 3.0) ** 2)
    assert (coeff.double() - expected).abs().max() <= 1e-5


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
def test_chunked_route_in_many_chunks(monkeypatch, dtype, softcap):
    """The CUDA backend's driver (ChunkedRoute) with the Triton epilogues, tiled into 4 row blocks of
    5 tokens and vocabulary chunks of 35 columns (130 = 3 * 35 + 25)."""
    hidden, weight, bias, targets = random_problem(18, 24, 130, dtype)
    monkeypatch.setattr(backends, "GPU_LOGITS_BLOCK_BYTES", 5 * 35 * 6)
    monkeypatch.setattr(backends, "GPU_MAX_BLOCK_ROWS", 5)
    route = backends.ChunkedRoute(logits_epilogue)
    assert route._tiles(18, weight, with_weights_buffer=dtype == torch.bfloat16) == (5, 35 if dtype == torch.bfloat16 else 52)
    logp, lse, jacobian = route.forward(hidden, weight, bias, targets, softcap, True)
    expected_logp = token_logprobs_oracle(hidden, weight, targets, bias, softcap=softcap)
    assert (logp.double() - expected_logp).abs().max() <= 1e-5 * expected_logp.abs().max()
    logp_no_grad, _, no_jacobian = route.forward(hidden, weight, bias, targets, softcap, False)
    assert no_jacobian is None and torch.allclose(logp_no_grad, logp, atol=1e-6)

    grad = torch.randn(18, device=KERNEL_DEVICE)
    expected = oracle_grads(hidden, weight, targets, grad, bias, softcap=softcap)
    # bf16 weights feed the second GEMM (as on tensor cores): bf16 relative rounding.
    rel = 1e-4 if dtype == torch.float32 else 2 ** -7
    jacobian_grad = grad[:, None] * jacobian
    assert (jacobian_grad.double() - expected[0]).abs().max() <= rel * expected[0].abs().max()
    got = route.backward(hidden, weight, bias, targets, lse, grad, softcap, True, True, True)
    for actual, want in zip(got, expected):
        assert (actual.double() - want).abs().max() <= rel * want.abs().max()


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)],
                         ids=["both", "hidden", "head"])
def test_one_sweep_summed_gradients_in_many_blocks(monkeypatch, dtype, softcap, need):
    """The triton backend's one-sweep route for scalar losses in row blocks of 4 tokens holding all
    130 vocabulary columns (18 = 4 * 4 + 2): log p and the gradients of sum(log p), in one pass."""
    hidden, weight, bias, targets = random_problem(18, 24, 130, dtype)
    bytes_per_logit = 4 if dtype == torch.float32 else 6
    monkeypatch.setattr(backends, "GPU_SUMMED_BLOCK_BYTES", 4 * 130 * bytes_per_logit + 5)
    backend = backends.TritonBackend()
    logp, *grads = backend.summed_grads(hidden, weight, bias, targets, softcap, *need)
    expected_logp = token_logprobs_oracle(hidden, weight, targets, bias, softcap=softcap)
    assert (logp.double() - expected_logp).abs().max() <= 1e-5 * expected_logp.abs().max()
    expected = oracle_grads(hidden, weight, targets, torch.ones(18, device=KERNEL_DEVICE), bias,
                            softcap=softcap)
    rel = 1e-4 if dtype == torch.float32 else 2 ** -7  # bf16 coefficients feed the GEMMs
    for needed, actual, want in zip((need[0], need[1], need[1]), grads, expected):
        if needed:
            assert (actual.double() - want).abs().max() <= rel * want.abs().max()
        else:
            assert actual is None


@needs_kernel_device
@pytest.mark.parametrize("need", [(True, False, False), (False, True, True), (True, True, False)],
                         ids=["hidden", "weight+bias", "hidden+weight"])
def test_recompute_backward_selected_outputs(need):
    hidden, weight, bias, targets = random_problem(33, 20, 150)
    lse, _ = oracle_lse(hidden, weight, bias, None)
    grad = torch.randn(33, device=KERNEL_DEVICE)
    got = logits_backward.logits_backward(hidden, weight, bias, targets, lse.float(), grad, None, *need)
    expected = oracle_grads(hidden, weight, targets, grad, bias)
    for needed, actual, want in zip(need, got, expected):
        if needed:
            assert (actual.double() - want).abs().max() <= 1e-4 * want.abs().max()
        else:
            assert actual is None


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trend", ["rising", "falling"])
def test_lse_forward_loops_over_d_and_vocabulary(dtype, trend):
    """d spans 2+ BLOCK_D steps of the largest config (the last partial) and one split spans 3+ BLOCK_V
    tiles; a bias rising along the vocabulary moves the running max up at every tile (each step
    rescales the sum), a falling one never does. 16-bit inputs are held to fp32 accumulation on the
    rounded inputs, not to eager 16-bit logits."""
    dim = 2 * largest(lse_forward, "BLOCK_D") + 13
    vocab = 3 * largest(lse_forward, "BLOCK_V") + 29
    hidden, weight, _, targets = random_problem(70, dim, vocab, dtype, with_bias=False)
    bias = torch.linspace(-12.0, 12.0, vocab, device=KERNEL_DEVICE).to(dtype)
    if trend == "falling":
        bias = bias.flip(0)
    lse, target_logit = lse_forward.lse_forward(hidden, weight, bias, targets, None, num_splits=1)
    expected_lse, logits = oracle_lse(hidden, weight, bias, None)
    expected_target = logits.gather(1, targets[:, None])[:, 0]
    assert (lse.double() - expected_lse).abs().max() <= 1e-5 * expected_lse.abs().max()
    assert (target_logit.double() - expected_target).abs().max() <= 1e-5 * expected_target.abs().max()


@needs_kernel_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_recompute_backward_loops_over_d(dtype):
    """Several BLOCK_D steps (last partial), several token and vocabulary tiles (last partial), and
    token tiles that are not a multiple of the launch group: every output row gets every tile."""
    dim = 2 * largest(logits_backward, "BLOCK_D") + 13
    n_tokens = (largest(logits_backward, "GROUP") + 1) * largest(logits_backward, "BLOCK_N") + 5
    vocab = 2 * largest(logits_backward, "BLOCK_V") + 29
    hidden, weight, bias, targets = random_problem(n_tokens, dim, vocab, dtype)
    lse, _ = oracle_lse(hidden, weight, bias, 2.5)
    grad = torch.randn(n_tokens, device=KERNEL_DEVICE)
    got = logits_backward.logits_backward(hidden, weight, bias, targets, lse.float(), grad, 2.5,
                                          True, True, True)
    expected = oracle_grads(hidden, weight, targets, grad, bias, softcap=2.5)
    # On tensor cores the coefficients are rounded to bf16 before the GEMMs (as eager autograd does).
    rel = 1e-4 if dtype == torch.float32 or INTERPRETING else 2 ** -7
    for actual, want in zip(got, expected):
        assert (actual.double() - want).abs().max() <= rel * want.abs().max()


def rows_far_apart(tensor, row_stride):
    """A view of `tensor` [R, C] whose rows lie `row_stride` elements apart in one large buffer, so
    that row index * stride passes 2^31 (the buffer is allocated, never touched but for these rows)."""
    rows, columns = tensor.shape
    storage = torch.empty(row_stride * (rows - 1) + columns, dtype=tensor.dtype, device=tensor.device)
    view = storage.as_strided((rows, columns), (row_stride, 1))
    view.copy_(tensor)
    return view


@needs_kernel_device
def test_offsets_past_two_to_the_31():
    """Element offsets of 2^31 and more (N * d or V * d past 2^31 in a real model): 32-bit index
    arithmetic wraps to a negative offset here, reading the wrong rows or faulting."""
    hidden, weight, _, targets = random_problem(3, 16, 5, torch.bfloat16, with_bias=False)
    far_hidden, far_weight = rows_far_apart(hidden, 2**30), rows_far_apart(weight, 2**29)
    expected_lse, logits = oracle_lse(hidden, weight, None, None)
    lse, target_logit = lse_forward.lse_forward(far_hidden, far_weight, None, targets, None)
    assert (lse.double() - expected_lse).abs().max() <= 1e-5 * expected_lse.abs().max()
    assert torch.allclose(target_logit.double(), logits.gather(1, targets[:, None])[:, 0], atol=1e-5)
    grad = torch.randn(3, device=KERNEL_DEVICE)
    got = logits_backward.logits_backward(far_hidden, far_weight, None, targets, lse, grad, None,
                                          True, True, False)
    near = logits_backward.logits_backward(hidden, weight, None, targets, lse, grad, None,
                                           True, True, False)
    assert torch.equal(got[0], near[0]) and torch.equal(got[1], near[1])

    logits_far = rows_far_apart(logits.float(), 2**29)
    running = [torch.full((3,), float("-inf"), device=KERNEL_DEVICE),
               torch.zeros(3, device=KERNEL_DEVICE), torch.zeros(3, device=KERNEL_DEVICE)]
    logits_epilogue.online_softmax_chunk(logits_far, targets, 0, None, *running)
    assert torch.allclose(running[0] + torch.log(running[1]), expected_lse.float(), atol=1e-5)


@needs_kernel_device
@pytest.mark.parametrize("shape", [(5, 3, 2), (1, 7, 8), (9, 4, 4), (3, 3, 8), (16, 1, 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_grouped_launch_order_visits_every_tile_once(shape):
    num_row_tiles, num_col_tiles, group = shape

    @triton.jit
    def record(out_ptr, num_row_tiles, num_col_tiles, GROUP: tl.constexpr):
        pid = tl.program_id(0)
        row_tile, col_tile = tl_utils.grouped_tile(pid, num_row_tiles, num_col_tiles, GROUP)
        tl.store(out_ptr + 2 * pid, row_tile)
        tl.store(out_ptr + 2 * pid + 1, col_tile)

    total = num_row_tiles * num_col_tiles
    out = torch.full((total, 2), -1, dtype=torch.int32, device=KERNEL_DEVICE)
    record[(total,)](out, num_row_tiles, num_col_tiles, GROUP=group)
    visited = sorted(map(tuple, out.cpu().tolist()))
    assert visited == [(r, c) for r in range(num_row_tiles) for c in range(num_col_tiles)]
    # Grouped: the first programs stay within the first `group` row tiles.
    first = out[: min(group, num_row_tiles) * num_col_tiles, 0].cpu()
    assert int(first.max()) < group


def test_token_bucket():
    assert [kernels.token_bucket(n) for n in (0, 1, 2, 3, 100, 128, 129, 10**6)] == [
        1, 1, 2, 4, 128, 128, 256, 2**16]


def fake_do_bench(kernel_call, quantiles):
    """The autotuner's benchmark, without a GPU timer: runs the trial once, reports equal times."""
    kernel_call()
    return [1.0, 1.0, 1.0]


def two_configs(module):
    base = module.INTERPRETER_CONFIGS[0] if INTERPRETING else module.GPU_CONFIGS_FP32[0]
    other = {**base.kwargs, "BLOCK_N": base.kwargs["BLOCK_N"] // 2}
    return [base, triton.Config(other, num_warps=base.num_warps, num_stages=base.num_stages)]


@needs_kernel_device
def test_autotune_key_holds_a_bucket_of_n(monkeypatch):
    """A new N re-tunes when it falls in a new power-of-two bucket, and only then; trial runs leave the
    atomically accumulated outputs zeroed, so the tuned call's results are right."""
    lse_tuned = autotuning.autotuned(lse_forward._lse_forward_kernel, two_configs(lse_forward),
                                     do_bench=fake_do_bench)
    backward_tuned = autotuning.autotuned(logits_backward._logits_backward_kernel,
                                          two_configs(logits_backward), do_bench=fake_do_bench,
                                          reset_to_zero=logits_backward.RESET_TO_ZERO)
    monkeypatch.setitem(lse_forward.TUNED, "fp32", lse_tuned)
    monkeypatch.setitem(logits_backward.TUNED, "fp32", backward_tuned)
    for n_tokens in (5, 7, 40):  # buckets 8, 8, 64
        hidden, weight, bias, targets = random_problem(n_tokens, 20, 150)
        lse, _ = lse_forward.lse_forward(hidden, weight, bias, targets, None, num_splits=1)
        expected_lse, _ = oracle_lse(hidden, weight, bias, None)
        assert (lse.double() - expected_lse).abs().max() <= 1e-5 * expected_lse.abs().max()
        grad = torch.randn(n_tokens, device=KERNEL_DEVICE)
        got = logits_backward.logits_backward(hidden, weight, bias, targets, lse, grad, None,
                                              True, True, True)
        for actual, want in zip(got, oracle_grads(hidden, weight, targets, grad, bias)):
            assert (actual.double() - want).abs().max() <= 1e-4 * want.abs().max()
    for tuned in (lse_tuned, backward_tuned):
        buckets = sorted(key[autotuning.AUTOTUNE_KEY.index("n_bucket")] for key in tuned.cache)
        assert buckets == [8, 64]


def test_on_device_selects_the_inputs_gpu():
    context = kernels.on_device(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert not isinstance(kernels.on_device(torch.empty(1)), torch.cuda.device)


@needs_kernel_device
def test_every_launcher_runs_under_its_inputs_device(monkeypatch):
    seen = []

    def recording(tensor):
        seen.append(tensor)
        return kernels.on_device(tensor)

    for module in (lse_forward, logits_backward, logits_epilogue):
        monkeypatch.setattr(module, "on_device", recording)
    hidden, weight, bias, targets = random_problem(6, 16, 40)
    lse, _ = lse_forward.lse_forward(hidden, weight, bias, targets, None)
    logits_backward.logits_backward(hidden, weight, bias, targets, lse, None, None, True, False, False)
    logits = (hidden @ weight.t()).contiguous()
    running = [torch.full((6,), float("-inf"), device=KERNEL_DEVICE),
               torch.zeros(6, device=KERNEL_DEVICE), torch.zeros(6, device=KERNEL_DEVICE)]
    logits_epilogue.online_softmax_chunk(logits, targets, 0, None, *running)
    logits_epilogue.grad_coefficients_chunk(logits, targets, 0, None, lse, lse, torch.empty_like(logits))
    assert [t is hidden for t in seen[:2]] == [True, True]
    assert [t is logits for t in seen[2:]] == [True, True]


@pytest.mark.skipif(INTERPRETING or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["chunked-triton", "fused-triton"])
def test_inputs_on_the_second_gpu(backend):
    from autoregembed_fast import token_logprobs

    torch.cuda.set_device(0)
    hidden, weight, bias, targets = (t.to("cuda:1") for t in random_problem(33, 40, 300))
    hidden.requires_grad_()
    logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    logp.sum().backward()
    assert logp.device == torch.device("cuda:1")
    expected = token_logprobs_oracle(hidden.detach(), weight, targets, bias)
    assert (logp.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    expected_grad = oracle_grads(hidden, weight, targets, torch.ones_like(logp), bias)[0]
    assert (hidden.grad.double() - expected_grad).abs().max() <= 1e-4 * expected_grad.abs().max()


# ---------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs (no GPU needed): every kernel in every autotune config, with
# the argument types of a real launch (strides of 1 are specialised by the JIT, so they are constants
# here too), checked for tensor-core instructions, relaxed atomics and register spills (`ptxas -v`).

PTR = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
UNIT_STRIDE = 1
ALIGNED_INTEGERS = ("D", "stride_hn", "stride_wv", "stride_logits", "stride_weights", "stride_coeff")


def aot_variants():
    """{variant id: (jit function, argument types, constexprs, num_warps, num_stages, expects tensor
    cores)} for every kernel x autotune config x operand dtype, with every flag on (the most registers)
    and, for the recompute backward, also the fused-Jacobian flags."""
    variants = {}
    for dtype, ptr in PTR.items():
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        operands = {"hidden_ptr": ptr, "weight_ptr": ptr, "bias_ptr": ptr, "targets_ptr": "*i64"}
        strides = {"N": "i32", "V": "i32", "D": "i32", "stride_hn": "i32", "stride_hd": "constexpr",
                   "stride_wv": "i32", "stride_wd": "constexpr", "stride_b": "constexpr",
                   "stride_t": "constexpr"}
        unit = {"stride_hd": UNIT_STRIDE, "stride_wd": UNIT_STRIDE, "stride_b": UNIT_STRIDE,
                "stride_t": UNIT_STRIDE}
        tensor_cores = dtype == torch.bfloat16
        configs = "GPU_CONFIGS_16BIT" if dtype == torch.bfloat16 else "GPU_CONFIGS_FP32"
        for index, config in enumerate(getattr(lse_forward, configs)):
            types = {**operands, "split_max_ptr": "*fp32", "split_sumexp_ptr": "*fp32",
                     "split_target_ptr": "*fp32", **strides, "softcap": "fp32", "num_splits": "i32",
                     "n_bucket": "i32"}
            constexprs = {**unit, **config.kwargs, "HAS_BIAS": True, "HAS_SOFTCAP": True,
                          "UPCAST": False}
            variants[f"lse_forward-{name}-config{index}"] = (
                lse_forward._lse_forward_kernel, types, constexprs, config.num_warps,
                config.num_stages, tensor_cores)
        for index, config in enumerate(getattr(logits_backward, configs)):
            types = {**operands, "lse_ptr": "*fp32", "grad_ptr": "*fp32", "grad_hidden_ptr": "*fp32",
                     "grad_weight_ptr": "*fp32", "grad_bias_ptr": "*fp32", **strides,
                     "softcap": "fp32", "n_bucket": "i32"}
            flags = {
                "trainable": {"HAS_GRAD": True, "NEED_HIDDEN": True, "NEED_WEIGHT": True,
                              "NEED_BIAS": True},
                "jacobian": {"HAS_GRAD": False, "NEED_HIDDEN": True, "NEED_WEIGHT": False,
                             "NEED_BIAS": False},
            }
            for flag_name, flag_values in flags.items():
                constexprs = {**unit, **config.kwargs, "HAS_BIAS": True, "HAS_SOFTCAP": True,
                              "UPCAST": False, **flag_values}
                variants[f"logits_backward-{flag_name}-{name}-config{index}"] = (
                    logits_backward._logits_backward_kernel, types, constexprs, config.num_warps,
                    config.num_stages, tensor_cores)
        epilogue = {"targets_ptr": "*i64", "Vc": "i32", "col_offset": "i32", "stride_logits": "i32",
                    "stride_t": "constexpr", "softcap": "fp32"}
        variants[f"online_softmax_chunk-{name}"] = (
            logits_epilogue._online_softmax_chunk_kernel,
            {"logits_ptr": "*fp32", "weights_ptr": ptr, "alpha_ptr": "*fp32",
             "running_max_ptr": "*fp32", "running_sumexp_ptr": "*fp32",
             "target_logit_ptr": "*fp32", "stride_weights": "i32", **epilogue},
            {"stride_t": UNIT_STRIDE, "BLOCK_V": logits_epilogue.GPU_BLOCK_V, "HAS_SOFTCAP": True,
             "WRITE_WEIGHTS": True}, 8, 3, False)
        variants[f"grad_coefficients_chunk-{name}"] = (
            logits_epilogue._grad_coefficients_chunk_kernel,
            {"logits_ptr": "*fp32", "coeff_ptr": ptr, "lse_ptr": "*fp32", "grad_ptr": "*fp32",
             "stride_coeff": "i32", **epilogue},
            {"stride_t": UNIT_STRIDE, "BLOCK_V": logits_epilogue.GPU_BLOCK_V, "HAS_SOFTCAP": True,
             "LOGITS_CAPPED": False}, 8, 3, False)
    return variants


def ptxas_binary() -> str:
    """The CUDA toolkit's ptxas (next to nvcc), else the one Triton ships."""
    if NVCC is not None:
        toolkit_ptxas = nvcc_toolkit_dir() / "bin" / "ptxas"
        if toolkit_ptxas.exists():
            return str(toolkit_ptxas)
    from triton import knobs

    return knobs.nvidia.ptxas.path


def ptxas_report(ptx: str, capability: int, workdir: Path) -> dict:
    """Registers and spill bytes of the PTX's kernel from `ptxas -v`."""
    import re

    source = workdir / "kernel.ptx"
    source.write_text(ptx)
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    done = subprocess.run([ptxas_binary(), "-v", f"--gpu-name={arch}", str(source), "-o",
                           str(workdir / "kernel.cubin")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    registers = re.search(r"Used (\d+) registers", done.stderr)
    return {"spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "registers": int(registers.group(1)), "ptxas": done.stderr.strip()[-600:]}


def aot_compile_all(capability: int, workdir: str) -> dict:
    """Compiles every variant for sm_<capability> (no GPU needed); returns what the tests check."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for variant, (kernel, types, constexprs, warps, stages, _) in aot_variants().items():
        signature = {**types, **{key: "constexpr" for key in constexprs}}
        # As the JIT specialises a real launch: torch's allocations are 16-byte aligned and model
        # widths (d, row strides) are multiples of 16, which is what lets loads vectorise and feed
        # asynchronous copies to shared memory.
        aligned = [name for name, kind in types.items()
                   if kind.startswith("*") or name in ALIGNED_INTEGERS]
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        source = ASTSource(kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        atomics = [line.strip() for line in ptx.splitlines() if re.search(r"\b(red|atom)\.", line)]
        results[variant] = {
            "target": f".target sm_{capability}" in ptx, "has_cubin": bool(compiled.asm["cubin"]),
            "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx, "atomics": atomics[:4],
            **ptxas_report(ptx, capability, Path(workdir)),
        }
    return results


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    """{capability: results of aot_compile_all}, compiled in a process without TRITON_INTERPRET (the
    interpreter replaces the compiler)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = {}
    for capability in (80, 90):
        workdir = tmp_path_factory.mktemp(f"aot-sm{capability}")
        script = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_kernels; "
                  f"print(json.dumps(test_kernels.aot_compile_all({capability}, {str(workdir)!r})))")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        results[capability] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("capability", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize("variant", sorted(aot_variants()))
def test_kernel_compiles_for_gpu(aot_results, variant, capability):
    result = aot_results[capability][variant]
    assert result["target"] and result["has_cubin"]
    if aot_variants()[variant][5]:
        tensor_core_op = "wgmma" if capability == 90 else "mma_sync"
        assert result[tensor_core_op], f"{variant} does not use tensor cores on sm_{capability}"


@pytest.mark.parametrize("variant", sorted(aot_variants()))
def test_kernel_does_not_spill_registers_on_hopper(aot_results, variant):
    result = aot_results[90][variant]
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result["ptxas"]


@pytest.mark.parametrize("variant", [v for v in sorted(aot_variants()) if "backward" in v])
def test_backward_atomics_are_relaxed(aot_results, variant):
    atomics = aot_results[90][variant]["atomics"]
    assert atomics, "no atomics found in the PTX"
    assert all(".relaxed" in line for line in atomics), atomics


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
