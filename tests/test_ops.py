"""token_logprobs against the float64 oracle, for every backend that runs on this machine."""

import math

import pytest
import torch

import autoregembed_fast
from autoregembed_fast import backends, ops, token_logprobs
from autoregembed_fast.kernels import INTERPRETING
from backends_under_test import BACKENDS, backend_device
from oracle import oracle_grads, rounding_bounds, token_logprobs_oracle

FLOAT64_BACKENDS = ["reference", "cpu"]
IGNORE = -100

# (leading shape, d, V): N=1 and V=1, V prime, d not a multiple of 8, a [B, T] leading shape.
SHAPES = [((1,), 8, 1), ((1,), 7, 13), ((37,), 13, 251), ((3, 11), 24, 509)]
SHAPE_IDS = ["N1-V1", "N1-V13", "N37-d13-V251", "B3xT11-V509"]

# Tolerances: float32 must match the float64 truth closely. 16-bit gradients are held, element by
# element, to what rounding the logit coefficients to the dtype and the result to the dtype can cost
# (`oracle.rounding_bounds` + u |truth|): a bound from the dtype and the inputs, not from any code
# under test.
FP32_LOGP_REL = 1e-5
FP32_GRAD_REL = 1e-4
FP32_GRAD_ABS = 1e-6  # where the true gradient is exactly 0 (V = 1), rounding leaves ~1e-9
# The reference backend's 16-bit gradients come from 16-bit logits (rounded before the softmax): that
# costs more than the coefficient rounding these bounds describe, so they are not generated (its fp32
# and float64 gradients are tested).
# The Triton interpreter (3.7.1) truncates fp32 -> 16-bit stores (a GPU rounds to nearest): its
# coefficients may be off by eps, not eps / 2.
def coefficient_rounding(backend, dtype) -> float:
    eps = torch.finfo(dtype).eps
    return eps if backend.endswith("triton") and INTERPRETING else eps / 2


GRADIENT_CASES = [pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
                  for backend in BACKENDS for dtype in (torch.float32, torch.bfloat16)
                  if not (backend == "reference" and dtype == torch.bfloat16)]


def make_inputs(lead_shape, d, V, dtype, *, with_bias=False, ignore_fraction=0.0, peaked=False,
                peak=4.0, device="cpu"):
    hidden = torch.randn(*lead_shape, d)
    weight = torch.randn(V, d) * (3.0 / math.sqrt(d))
    targets = torch.randint(0, V, lead_shape)
    if peaked:
        # Each token's target row points along its hidden state: a softmax with one dominant entry.
        # Distinct targets, so that no token's target row is overwritten by another token's.
        targets = torch.randperm(V)[: targets.numel()].reshape(lead_shape)
        flat_hidden, flat_targets = hidden.reshape(-1, d), targets.reshape(-1)
        weight[flat_targets] = flat_hidden * (peak / flat_hidden.norm(dim=1, keepdim=True))
    if ignore_fraction > 0:
        targets[torch.rand(lead_shape) < ignore_fraction] = IGNORE
    bias = torch.randn(V) if with_bias else None
    cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    return cast(hidden), cast(weight), targets.to(device), cast(bias)


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def scale_of(expected):
    return expected.abs().max().item() if expected.numel() else 0.0


def max_abs_logit(hidden, weight, bias=None) -> float:
    """max |z| of the logits of the (rounded) inputs, in float64."""
    logits = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return float(logits.abs().max())


def logp_bound(expected, dtype, backend, max_logit) -> float:
    """Every fused backend accumulates in fp32 whatever the input dtype, so its log-probs are held to
    fp32 accuracy on the (rounded) inputs. The materialised eager path ("reference") rounds its 16-bit
    logits (the GEMM's output, then the bias sum: at most eps * |z| each), and log p = z_y - lse(z)
    moves by at most twice the largest logit error: an independent bound, not eager's own error."""
    fp32 = FP32_LOGP_REL * max(1.0, scale_of(expected))
    if backend != "reference" or dtype in (torch.float32, torch.float64):
        return fp32
    return 2 * torch.finfo(dtype).eps * max_logit + fp32


def assert_logp_close(actual, expected, dtype, backend, max_logit):
    assert max_err(actual, expected) <= logp_bound(expected, dtype, backend, max_logit)


def assert_grad_close(actual, expected, dtype, rounding, extra_abs=0.0):
    """fp32 / float64: within FP32_GRAD_REL of the gradient's scale. 16-bit: each element within
    `rounding` (the coefficient-rounding bound of `oracle.rounding_bounds`) + the rounding of the
    result to the dtype (u |truth|) + the fp32 terms."""
    assert actual.dtype == dtype
    bound = FP32_GRAD_REL * scale_of(expected) + FP32_GRAD_ABS + extra_abs
    if dtype in (torch.float32, torch.float64):
        assert max_err(actual, expected) <= bound
        return
    elementwise = rounding.to(expected.device) + torch.finfo(dtype).eps / 2 * expected.abs() + bound
    excess = (actual.double() - expected).abs() - elementwise
    assert excess.max().item() <= 0, f"over the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.7], ids=["all-kept", "mostly-ignored"])
def test_forward_matches_oracle(backend, shape, dtype, with_bias, softcap, ignore_fraction):
    lead_shape, d, V = shape
    hidden, weight, targets, bias = make_inputs(
        lead_shape, d, V, dtype, with_bias=with_bias, ignore_fraction=ignore_fraction,
        device=backend_device(backend),
    )
    expected = token_logprobs_oracle(hidden, weight, targets, bias, IGNORE, softcap)
    actual = token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap, backend=backend)
    assert actual.shape == targets.shape
    assert actual.dtype == torch.float32
    assert_logp_close(actual, expected, dtype, backend, max_abs_logit(hidden, weight, bias))
    assert (actual[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peaked_softmax(backend, dtype):
    hidden, weight, targets, _ = make_inputs((29,), 16, 307, dtype, peaked=True,
                                             device=backend_device(backend))
    expected = token_logprobs_oracle(hidden, weight, targets)
    actual = token_logprobs(hidden, weight, targets, backend=backend)
    assert expected.max() > -0.5  # the construction really is peaked
    assert_logp_close(actual, expected, dtype, backend, max_abs_logit(hidden, weight))


@pytest.mark.parametrize("backend, dtype", GRADIENT_CASES)
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["nocap", "cap20"])
def test_peaked_softmax_gradients(backend, dtype, softcap):
    """Confident tokens have small gradients: the error must shrink with them (a Jacobian formed as
    W[y] - softmax @ W in low precision would leave an error of order eps * |W[y]|)."""
    hidden, weight, targets, _ = make_inputs((29,), 16, 307, dtype, peaked=True, peak=10.0,
                                             device=backend_device(backend))
    grad_out = torch.randn(29).to(hidden.device)
    expected = oracle_grads(hidden, weight, targets, grad_out, softcap=softcap)[0]
    rounding = rounding_bounds(hidden, weight, targets, grad_out,
                               coefficient_rounding(backend, dtype), softcap=softcap)[0]
    _, actual = run_with_grads(backend, hidden, weight, targets, None, softcap, grad_out,
                               trainable_head=False)
    assert expected.abs().max() < 0.2 * weight.float().norm(dim=1).max()  # really peaked
    # Every lse-based kernel carries an fp32 rounding of the log-sum-exp (a few ulps of |lse|) into
    # p_target, hence an absolute error of that size times |W[target]|: allowed, and ~200 times
    # smaller than what a low-precision W[y] - softmax @ W leaves.
    lse = token_logprobs_oracle(hidden, weight, targets, softcap=softcap) - (
        hidden.double() @ weight.double().t()).gather(1, targets[:, None])[:, 0]
    lse_rounding = 4 * torch.finfo(torch.float32).eps * lse.abs().max() * weight.float().abs().max()
    assert_grad_close(actual[0], expected, dtype, rounding, extra_abs=lse_rounding.item())


def run_with_grads(backend, hidden, weight, targets, bias, softcap, grad_out, *, trainable_head):
    """token_logprobs forward + backward with upstream gradient grad_out; returns (logp, grads)."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_(trainable_head)
    bias = None if bias is None else bias.detach().clone().requires_grad_(trainable_head)
    logp = token_logprobs(hidden, weight, targets, bias=bias, softcap=softcap, backend=backend)
    logp.backward(grad_out)
    return logp, (hidden.grad, weight.grad, None if bias is None else bias.grad)


@pytest.mark.parametrize("backend, dtype", GRADIENT_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.7], ids=["all-kept", "mostly-ignored"])
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_gradients_match_oracle(
    backend, shape, dtype, with_bias, softcap, ignore_fraction, trainable_head
):
    lead_shape, d, V = shape
    hidden, weight, targets, bias = make_inputs(
        lead_shape, d, V, dtype, with_bias=with_bias, ignore_fraction=ignore_fraction,
        device=backend_device(backend),
    )
    # A random per-token upstream gradient: an implementation that only handles a scalar loss fails.
    grad_out = torch.randn(lead_shape).to(hidden.device)
    expected = oracle_grads(hidden, weight, targets, grad_out, bias, IGNORE, softcap)
    rounding = rounding_bounds(hidden, weight, targets, grad_out, coefficient_rounding(backend, dtype),
                               bias, IGNORE, softcap)
    _, actual = run_with_grads(backend, hidden, weight, targets, bias, softcap, grad_out,
                               trainable_head=trainable_head)
    assert_grad_close(actual[0], expected[0], dtype, rounding[0])
    if trainable_head:
        assert_grad_close(actual[1], expected[1], dtype, rounding[1])
        if bias is not None:
            assert_grad_close(actual[2], expected[2], dtype, rounding[2])
    else:
        assert actual[1] is None and actual[2] is None
    assert (actual[0][targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_only_trainable(backend):
    """Weight and bias trainable while hidden is not: the recompute backward skips grad_hidden."""
    hidden, weight, targets, bias = make_inputs((23,), 12, 97, torch.float32, with_bias=True,
                                                device=backend_device(backend))
    grad_out = torch.randn(23).to(hidden.device)
    weight = weight.requires_grad_()
    bias = bias.requires_grad_()
    token_logprobs(hidden, weight, targets, bias=bias, backend=backend).backward(grad_out)
    _, expected_weight, expected_bias = oracle_grads(hidden, weight, targets, grad_out, bias)
    assert max_err(weight.grad, expected_weight) <= FP32_GRAD_REL * scale_of(expected_weight)
    assert max_err(bias.grad, expected_bias) <= FP32_GRAD_REL * scale_of(expected_bias)


def as_layout(tensor, layout):
    """`tensor`'s values in another memory layout (a leaf, so it can require grad): the views a user
    hands over. "expanded" repeats the first row / element (its values differ from `tensor`'s; the
    tests compare with its own contiguous copy)."""
    if layout == "transposed":  # e.g. a head stored as [d, V]
        return tensor.t().contiguous().t()
    if layout == "strided":  # every other element of a wider buffer along the last dim
        buffer = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype,
                             device=tensor.device)
        buffer[..., ::2] = tensor
        return buffer[..., ::2]
    if layout == "row-strided":  # every other row
        buffer = torch.zeros(2 * tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype,
                             device=tensor.device)
        buffer[::2] = tensor
        return buffer[::2]
    if layout == "offset":  # a view that starts 7 elements into its storage
        buffer = torch.zeros(tensor.numel() + 7, dtype=tensor.dtype, device=tensor.device)
        view = buffer[7:].view(tensor.shape)
        view.copy_(tensor)
        return view
    if layout == "expanded":  # stride 0 along the first dim
        return tensor[:1].expand(tensor.shape)
    raise ValueError(layout)


LAYOUT_CASES = [
    ("hidden", layout) for layout in ("transposed", "strided", "row-strided", "offset", "expanded")
] + [
    ("weight", layout) for layout in ("transposed", "strided", "row-strided", "offset")
] + [
    ("targets", layout) for layout in ("strided", "offset", "expanded")
] + [
    ("bias", layout) for layout in ("strided", "offset")
]


def run_mode(backend, mode, hidden, weight, targets, bias, grad_out):
    """token_logprobs in one of the three modes; returns (logp, grads of the inputs that require
    them). The inputs are used as given (no copy), so their layout reaches the backend."""
    if mode == "nograd":
        with torch.no_grad():
            return token_logprobs(hidden, weight, targets, bias=bias, backend=backend), ()
    hidden.requires_grad_()
    trainable = [hidden]
    if mode == "trainable-head":
        trainable += [weight.requires_grad_(), bias.requires_grad_()]
    logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    grads = torch.autograd.grad(logp, trainable, grad_out)
    return logp.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=["-".join(case) for case in LAYOUT_CASES])
@pytest.mark.parametrize("mode", ["nograd", "frozen-head", "trainable-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_any_input_layout_gives_the_contiguous_answer(backend, case, mode, dtype):
    """Transposed, strided, offset and broadcast views of each input give the answer of their
    contiguous copies (values and gradients), and both match the float64 oracle."""
    argument, layout = case
    hidden, weight, targets, bias = make_inputs((19,), 24, 257, dtype, with_bias=True,
                                                device=backend_device(backend))
    inputs = {"hidden": hidden, "weight": weight, "targets": targets, "bias": bias}
    inputs[argument] = as_layout(inputs[argument], layout)
    assert inputs[argument].storage_offset() > 0 or not inputs[argument].is_contiguous()
    contiguous = {name: value.clone(memory_format=torch.contiguous_format)
                  for name, value in inputs.items()}
    grad_out = torch.randn(19).to(hidden.device)

    logp, grads = run_mode(backend, mode, grad_out=grad_out, **inputs)
    logp_contiguous, grads_contiguous = run_mode(backend, mode, grad_out=grad_out, **contiguous)
    expected = token_logprobs_oracle(contiguous["hidden"].detach(), contiguous["weight"].detach(),
                                     contiguous["targets"], contiguous["bias"].detach())
    assert max_err(logp, logp_contiguous) <= FP32_LOGP_REL * max(1.0, scale_of(expected))
    if backend != "reference":
        assert max_err(logp, expected) <= FP32_LOGP_REL * max(1.0, scale_of(expected))
    # Gradients: the same computation on other strides (a GEMM may sum in another order); 16-bit
    # backends round their GEMM operands, so one ulp of the input dtype at the gradient's scale.
    tolerance = FP32_GRAD_REL if dtype == torch.float32 else torch.finfo(dtype).eps
    expected_grads = oracle_grads(contiguous["hidden"], contiguous["weight"], contiguous["targets"],
                                  grad_out, contiguous["bias"])
    for got, want, truth in zip(grads, grads_contiguous, expected_grads):
        assert max_err(got, want) <= tolerance * scale_of(truth) + FP32_GRAD_ABS


@pytest.mark.parametrize("block_bytes", [1, 5 * 251 * 4, 1 << 30], ids=["1-row", "5-rows", "one-block"])
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_cpu_block_boundaries(monkeypatch, block_bytes, trainable_head):
    """Blocks of 1 and 5 tokens (37 is not a multiple of 5) give the same results as one block."""
    monkeypatch.setattr(backends, "CPU_LOGITS_BLOCK_BYTES", block_bytes)
    hidden, weight, targets, bias = make_inputs((37,), 13, 251, torch.float32, with_bias=True)
    grad_out = torch.randn(37)
    logp, grads = run_with_grads("cpu", hidden, weight, targets, bias, 2.5, grad_out,
                                 trainable_head=trainable_head)
    assert max_err(logp, token_logprobs_oracle(hidden, weight, targets, bias, softcap=2.5)) <= 1e-5 * 10
    expected = oracle_grads(hidden, weight, targets, grad_out, bias, softcap=2.5)
    for got, want in zip(grads, expected):
        if got is not None:
            assert max_err(got, want) <= FP32_GRAD_REL * scale_of(want)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "cap2"])
def test_gradcheck_float64(backend, softcap):
    hidden, weight, targets, bias = make_inputs((2, 3), 5, 11, torch.float64, with_bias=True)
    targets[0, 1] = IGNORE
    hidden.requires_grad_()

    def frozen_head(h):
        return token_logprobs(h, weight, targets, bias=bias, softcap=softcap, backend=backend)

    def trainable_head(h, w, b):
        return token_logprobs(h, w, targets, bias=b, softcap=softcap, backend=backend)

    assert torch.autograd.gradcheck(frozen_head, (hidden,))
    assert torch.autograd.gradcheck(
        trainable_head, (hidden, weight.requires_grad_(), bias.requires_grad_())
    )


def test_float64_output_dtype():
    hidden, weight, targets, _ = make_inputs((4,), 6, 10, torch.float64)
    assert token_logprobs(hidden, weight, targets).dtype == torch.float64


@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - set(FLOAT64_BACKENDS)))
def test_float64_rejected_by_fp32_backends(backend):
    hidden, weight, targets, _ = make_inputs((4,), 6, 10, torch.float64,
                                             device=backend_device(backend))
    with pytest.raises(TypeError, match=backend):
        token_logprobs(hidden, weight, targets, backend=backend)


# (hidden, weight, bias) dtypes that differ: the op computes in their promoted dtype.
MIXED_DTYPES = {
    "bf16-hidden-fp32-head": (torch.bfloat16, torch.float32, torch.float32),
    "fp32-hidden-bf16-head": (torch.float32, torch.bfloat16, torch.bfloat16),
    "fp16-hidden-fp32-head-bf16-bias": (torch.float16, torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", sorted(MIXED_DTYPES))
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_mixed_dtypes_compute_in_the_promoted_dtype(backend, dtypes, trainable_head):
    """Outside autocast, mixed dtypes follow torch's type promotion: the result is the op on the
    inputs cast to the promoted dtype (fp32 for every case here), and each gradient comes back in its
    input's own dtype."""
    hidden_dtype, weight_dtype, bias_dtype = MIXED_DTYPES[dtypes]
    hidden, weight, targets, bias = make_inputs((19,), 12, 71, torch.float32, with_bias=True,
                                                ignore_fraction=0.2, device=backend_device(backend))
    hidden, weight, bias = hidden.to(hidden_dtype), weight.to(weight_dtype), bias.to(bias_dtype)
    grad_out = torch.randn(19).to(hidden.device)
    promoted = [t.detach().float() for t in (hidden, weight, bias)]
    expected_logp = token_logprobs_oracle(*promoted[:2], targets, promoted[2], IGNORE)
    expected = oracle_grads(promoted[0], promoted[1], targets, grad_out, promoted[2], IGNORE)

    hidden.requires_grad_()
    weight.requires_grad_(trainable_head)
    bias.requires_grad_(trainable_head)
    logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    logp.backward(grad_out)
    assert logp.dtype == torch.float32
    assert max_err(logp, expected_logp) <= FP32_LOGP_REL * max(1.0, scale_of(expected_logp))
    pairs = [(hidden, expected[0])] + ([(weight, expected[1]), (bias, expected[2])] if trainable_head
                                       else [])
    for tensor, truth in pairs:
        assert tensor.grad.dtype == tensor.dtype
        # The gradient is right in fp32, then rounded once to its input's dtype.
        bound = (FP32_GRAD_REL + torch.finfo(tensor.dtype).eps) * scale_of(truth) + FP32_GRAD_ABS
        assert max_err(tensor.grad, truth) <= bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_autocast_computes_as_the_lm_head_would(backend, autocast_dtype, trainable_head):
    """Under autocast, fp32 hidden, head and bias are cast to the autocast dtype (as `lm_head`'s
    linear is) and the softmax accumulates in fp32: the result is the op on the rounded inputs, with
    fp32 accuracy; gradients reach the fp32 leaves in fp32."""
    hidden, weight, targets, bias = make_inputs((19,), 12, 71, torch.float32, with_bias=True,
                                                device=backend_device(backend))
    grad_out = torch.randn(19).to(hidden.device)
    rounded = [t.to(autocast_dtype).float() for t in (hidden, weight, bias)]
    expected_logp = token_logprobs_oracle(*rounded[:2], targets, rounded[2], IGNORE)
    expected = oracle_grads(*rounded[:2], targets, grad_out, rounded[2], IGNORE)

    hidden.requires_grad_()
    weight.requires_grad_(trainable_head)
    bias.requires_grad_(trainable_head)
    with torch.autocast(hidden.device.type, dtype=autocast_dtype):
        logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)
    logp.backward(grad_out)
    assert logp.dtype == torch.float32
    if backend == "reference":  # the eager path rounds its logits to the autocast dtype, as eager does
        bound = 4 * torch.finfo(autocast_dtype).eps * max(1.0, scale_of(expected_logp))
    else:
        bound = FP32_LOGP_REL * max(1.0, scale_of(expected_logp))
    assert max_err(logp, expected_logp) <= bound
    pairs = [(hidden, expected[0])] + ([(weight, expected[1]), (bias, expected[2])] if trainable_head
                                       else [])
    for tensor, truth in pairs:
        assert tensor.grad.dtype == torch.float32
        # Gradients flow back through the cast: right to the rounding of the autocast dtype.
        assert max_err(tensor.grad, truth) <= 4 * torch.finfo(autocast_dtype).eps * scale_of(truth)


@pytest.mark.parametrize("backend, dtype", GRADIENT_CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["nocap", "cap3"])
@pytest.mark.parametrize("trainable", ["hidden", "head", "both"])
def test_summed_token_logprobs_gradients_match_oracle(backend, shape, dtype, with_bias, softcap,
                                                      trainable):
    """The sum over tokens with gradients formed in the forward, scaled by a random upstream scalar."""
    lead_shape, d, V = shape
    hidden, weight, targets, bias = make_inputs(lead_shape, d, V, dtype, with_bias=with_bias,
                                                ignore_fraction=0.3, device=backend_device(backend))
    upstream = torch.randn(())
    grad_out = torch.full(lead_shape, upstream.item()).to(hidden.device)
    expected_logp = token_logprobs_oracle(hidden, weight, targets, bias, IGNORE, softcap)
    expected = oracle_grads(hidden, weight, targets, grad_out, bias, IGNORE, softcap)
    rounding = rounding_bounds(hidden, weight, targets, grad_out, coefficient_rounding(backend, dtype),
                               bias, IGNORE, softcap)

    leaves = [hidden.detach().clone().requires_grad_(trainable != "head"),
              weight.detach().clone().requires_grad_(trainable != "hidden"),
              None if bias is None else bias.detach().clone().requires_grad_(trainable != "hidden")]
    total = ops.summed_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], softcap=softcap,
                                      backend=backend)
    (total * upstream.to(total.device)).backward()
    assert total.shape == ()
    # A sum of N per-token values: N times the per-token bound.
    per_token = logp_bound(expected_logp, dtype, backend, max_abs_logit(hidden, weight, bias))
    assert max_err(total, expected_logp.sum()) <= per_token * targets.numel()
    for index, (leaf, truth) in enumerate(zip(leaves, expected)):
        if leaf is None or not leaf.requires_grad:
            assert leaf is None or leaf.grad is None
            continue
        assert_grad_close(leaf.grad, truth, dtype, rounding[index])


def test_summed_token_logprobs_trainable_head_needs_no_recompute(cpu_spy):
    """A scalar loss on the CPU backend: one forward sweep forms every gradient, the backward only
    scales them (no recompute, no second sweep)."""
    hidden, weight, targets, bias = make_inputs((9,), 6, 31, torch.float32, with_bias=True)
    for tensor in (hidden, weight, bias):
        tensor.requires_grad_()
    ops.summed_token_logprobs(hidden, weight, targets, bias=bias).backward()
    assert cpu_spy.summed_calls == [(9, True, True)]
    assert cpu_spy.forward_calls == [] and cpu_spy.backward_calls == 0


def test_summed_token_logprobs_refuses_a_second_backward():
    """Its gradients are scaled in place: a second backward must raise, never double-scale."""
    hidden, weight, targets, _ = make_inputs((9,), 6, 31, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    total = ops.summed_token_logprobs(hidden, weight, targets)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        total.backward()


class BackendSpy:
    """Wraps the CPU backend and records what each call received."""

    def __init__(self):
        self.inner = backends.CpuBackend()
        self.dtypes = self.inner.dtypes
        self.forward_calls = []
        self.backward_calls = 0
        self.summed_calls = []

    def forward(self, hidden, weight, bias, targets, softcap, with_jacobian):
        self.forward_calls.append((hidden.shape[0], with_jacobian))
        return self.inner.forward(hidden, weight, bias, targets, softcap, with_jacobian)

    def backward(self, *args):
        self.backward_calls += 1
        return self.inner.backward(*args)

    def summed_grads(self, hidden, weight, bias, targets, softcap, need_hidden, need_head):
        self.summed_calls.append((hidden.shape[0], need_hidden, need_head))
        return self.inner.summed_grads(hidden, weight, bias, targets, softcap, need_hidden, need_head)


@pytest.fixture
def cpu_spy(monkeypatch):
    spy = BackendSpy()
    monkeypatch.setattr(backends, "CpuBackend", lambda: spy)
    return spy


def test_ignored_tokens_never_reach_the_kernel(cpu_spy):
    hidden, weight, targets, _ = make_inputs((5, 8), 6, 31, torch.float32, ignore_fraction=0.6)
    kept = int((targets != IGNORE).sum())
    assert 0 < kept < targets.numel()
    token_logprobs(hidden, weight, targets)
    assert cpu_spy.forward_calls == [(kept, False)]


def test_frozen_head_uses_the_jacobian_and_no_recompute(cpu_spy):
    hidden, weight, targets, _ = make_inputs((9,), 6, 31, torch.float32)
    hidden.requires_grad_()
    token_logprobs(hidden, weight, targets).sum().backward()
    assert cpu_spy.forward_calls == [(9, True)]
    assert cpu_spy.backward_calls == 0


def test_trainable_head_recomputes(cpu_spy):
    hidden, weight, targets, _ = make_inputs((9,), 6, 31, torch.float32)
    weight.requires_grad_()
    token_logprobs(hidden, weight, targets).sum().backward()
    assert cpu_spy.forward_calls == [(9, False)]
    assert cpu_spy.backward_calls == 1


def test_no_grad_runs_only_the_logsumexp_sweep(cpu_spy):
    hidden, weight, targets, _ = make_inputs((9,), 6, 31, torch.float32)
    hidden.requires_grad_()
    weight.requires_grad_()
    with torch.no_grad():
        logp = token_logprobs(hidden, weight, targets)
    assert logp.grad_fn is None
    assert cpu_spy.forward_calls == [(9, False)]
    assert max_err(logp, token_logprobs_oracle(hidden, weight, targets)) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    hidden, weight, targets, _ = make_inputs((4, 3), 6, 17, torch.float32,
                                             device=backend_device(backend))
    targets.fill_(IGNORE)
    hidden.requires_grad_()
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    assert logp.shape == (4, 3)
    assert (logp == 0).all()
    logp.backward(torch.randn(4, 3).to(hidden.device))
    assert (hidden.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead_shape", [(0,), (2, 0)], ids=["N0", "B2xT0"])
def test_empty_input(backend, lead_shape):
    """No tokens: an empty fp32 result of the leading shape, and gradients of the inputs' shapes
    (zero for the head: no token used it) through a backward that runs no kernel."""
    device = backend_device(backend)
    hidden = torch.randn(*lead_shape, 6, device=device, requires_grad=True)
    weight = torch.randn(17, 6, device=device, requires_grad=True)
    targets = torch.zeros(lead_shape, dtype=torch.long, device=device)
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    assert logp.shape == lead_shape and logp.dtype == torch.float32
    logp.sum().backward()
    assert hidden.grad.shape == hidden.shape
    assert weight.grad is None or torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden-nan", "hidden-inf", "weight-inf", "bias-nan"])
def test_non_finite_inputs_raise(backend, where):
    hidden, weight, targets, bias = make_inputs((6,), 5, 19, torch.float32, with_bias=True,
                                                device=backend_device(backend))
    tensor, value = {
        "hidden-nan": (hidden, math.nan), "hidden-inf": (hidden, math.inf),
        "weight-inf": (weight, math.inf), "bias-nan": (bias, math.nan),
    }[where]
    tensor.view(-1)[3] = value
    with pytest.raises(ValueError, match="non-finite"):
        token_logprobs(hidden, weight, targets, bias=bias, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hidden_in_an_ignored_row_is_not_scored(backend):
    hidden, weight, targets, _ = make_inputs((6,), 5, 19, torch.float32,
                                             device=backend_device(backend))
    hidden[2] = math.nan
    targets[2] = IGNORE
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isfinite(logp).all()


def bad_input_cases(device="cpu"):
    """{case: (overrides of the good arguments, exception type, text the message must hold)}, and the
    good arguments, on `device`."""
    hidden, weight = torch.randn(4, 6, device=device), torch.randn(17, 6, device=device)
    targets = torch.randint(0, 17, (4,), device=device)
    bias = torch.randn(17, device=device)
    return {
        "weight-1d": (dict(weight=weight[:, 0]), ValueError, "weight"),
        "hidden-d-mismatch": (dict(hidden=hidden[:, :5]), ValueError, "hidden"),
        "targets-shape": (dict(targets=torch.cat([targets, targets[:1]])), ValueError, "targets"),
        "bias-shape": (dict(bias=bias[:16]), ValueError, "bias"),
        "weight-int": (dict(weight=weight.long()), TypeError, "weight"),
        "bias-int": (dict(bias=bias.long()), TypeError, "bias"),
        "hidden-int": (dict(hidden=hidden.long(), weight=weight.long()), TypeError, "hidden"),
        "targets-float": (dict(targets=targets.float()), TypeError, "targets"),
        "targets-bool": (dict(targets=targets > 3), TypeError, "targets"),
        "target-too-large": (dict(targets=torch.tensor([0, 17, 1, 2], device=device)), ValueError,
                             "17"),
        "target-negative": (dict(targets=torch.tensor([0, -1, 1, 2], device=device)), ValueError,
                            "-1"),
        "weight-device": (dict(weight=torch.empty(17, 6, device="meta")), ValueError, "weight"),
        "targets-device": (dict(targets=torch.empty(4, dtype=torch.long, device="meta")), ValueError,
                           "targets"),
        "hidden-not-tensor": (dict(hidden=[[0.0] * 6] * 4), TypeError, "hidden"),
        "softcap-zero": (dict(softcap=0.0), ValueError, "softcap"),
        "softcap-nan": (dict(softcap=math.nan), ValueError, "softcap"),
        "softcap-string": (dict(softcap="1"), TypeError, "softcap"),
        "unknown-backend": (dict(backend="cuda-magic"), ValueError, "backend"),
    }, dict(hidden=hidden, weight=weight, targets=targets, bias=bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(bad_input_cases()[0]))
def test_bad_input_raises(backend, case):
    cases, good_args = bad_input_cases(backend_device(backend))
    overrides, error, message = cases[case]
    args = {**good_args, "backend": backend, **overrides}
    with pytest.raises(error, match=message):
        token_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_cpu_backend_rejects_other_devices():
    hidden = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="backend='cpu'"):
        token_logprobs(hidden, torch.empty(17, 6, device="meta"),
                       torch.empty(4, dtype=torch.long, device="meta"), backend="cpu")


@pytest.mark.parametrize("backend", ["chunked-cuda", "chunked-triton", "fused-triton"])
def test_gpu_backends_reject_cpu_tensors(monkeypatch, backend):
    monkeypatch.setattr(ops, "INTERPRETING", False)  # as outside the Triton interpreter
    hidden, weight, targets, _ = make_inputs((4,), 6, 10, torch.float32)
    with pytest.raises(ValueError, match=f"backend='{backend}' needs CUDA tensors"):
        token_logprobs(hidden, weight, targets, backend=backend)


def test_int32_targets_accepted():
    hidden, weight, targets, _ = make_inputs((7,), 6, 17, torch.float32)
    expected = token_logprobs(hidden, weight, targets)
    assert torch.equal(token_logprobs(hidden, weight, targets.int()), expected)


def test_unknown_backend_names_the_choices():
    hidden, weight, targets, _ = make_inputs((3,), 4, 5, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'tritonn'.*chunked-triton"):
        token_logprobs(hidden, weight, targets, backend="tritonn")


def test_public_api():
    assert autoregembed_fast.token_logprobs is token_logprobs
    assert "reference" in autoregembed_fast.BACKENDS and "cpu" in autoregembed_fast.BACKENDS
