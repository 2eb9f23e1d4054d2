"""Benchmark of the token log-likelihood op: time, peak memory and error of each implementation.

Each (implementation, mode) runs in a fresh subprocess, so its peak memory is its own, measured on a
call after warm-up: on CPU the peak RSS above the RSS before the call (`bench.memory.PeakRss`: the
kernel's high-water mark reset, glibc made to return freed blocks), on a GPU `max_memory_allocated`
above the allocation before the call.
Times are medians after warm-up (`triton.testing.do_bench` on a GPU, perf_counter on CPU). The plain
GEMMs of the same shape are timed in the same run as "gemm-floor" (1 GEMM for no-grad, 2 for a frozen
head's forward + backward, 3 with a trainable head, per-token or as a scalar mean cross-entropy
loss), and each row reports the fraction of that rate it reaches. Errors are against the float64
oracle of tests/oracle.py (imported as `tests.oracle`) on the first tokens, so that a fast but wrong
entry shows. An implementation that cannot run here is listed as skipped, with why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.memory import PeakRss
from tests.oracle import oracle_grads, token_logprobs_oracle

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

PRESETS = {  # name: (d, V)
    "smollm2-135m": (576, 49_152),
    "llama2-7b": (4_096, 32_000),
    "llama3-8b": (4_096, 128_256),
}
MODES = ("nograd", "frozen", "trainable", "trainable-loss")
# GEMM-equivalents (2*N*d*V FLOPs each) the work of each mode needs: the logits; plus the Jacobian
# (frozen head, grad_hidden only); plus grad_hidden and grad_weight (trainable head, per-token
# upstream gradients, or a scalar mean cross-entropy loss: "trainable-loss").
GEMMS_PER_MODE = {"nograd": 1, "frozen": 2, "trainable": 3, "trainable-loss": 3}
TRAINABLE_MODES = ("trainable", "trainable-loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ORACLE_TOKENS = 128
CHUNK_TOKENS = 1024


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad_out: torch.Tensor


def make_problem(n_tokens, dim, vocab, dtype, device, seed=0) -> Problem:
    # Drawn on the device itself: a 128k x 4096 head drawn on the CPU takes seconds.
    generator = torch.Generator(device=device).manual_seed(seed)
    draw = dict(generator=generator, device=device)
    hidden = torch.randn(n_tokens, dim, **draw)
    weight = torch.randn(vocab, dim, **draw) * (2.0 / dim**0.5)
    targets = torch.randint(0, vocab, (n_tokens,), **draw)
    grad_out = torch.randn(n_tokens, **draw)
    return Problem(hidden.to(dtype), weight.to(dtype), targets, grad_out)


# --------------------------------------------------------------------------------------------------
# Implementations: each maps (hidden [N, d], weight [V, d], targets [N]) to log p [N]; `needs` says
# why one cannot run on a device (None when it can).


def plain_gemms(problem: Problem, mode: str):
    """The GEMMs the op cannot avoid, at full size: the floor the fused implementations aim at. bf16
    on a CPU with AVX512-BF16: with fp32 output (the op's contract), through the package's bf16 GEMM,
    as torch has none there (its bf16 GEMMs round their output: "torch-bf16-gemms")."""
    if problem.hidden.dtype == torch.bfloat16 and problem.hidden.device.type == "cpu":
        from autoregembed_fast import _C
        from autoregembed_fast.backends import cpu_bf16_gemm

        if cpu_bf16_gemm():
            hidden, weight = problem.hidden.detach(), problem.weight.detach()
            logits = _C.bf16_matmul_cpu(hidden, weight.t())
            if mode != "nograd":
                coefficients = logits.to(torch.bfloat16)
                _C.bf16_matmul_cpu(coefficients, weight)
            if mode in TRAINABLE_MODES:
                _C.bf16_matmul_cpu(coefficients.t(), hidden)
            return
    torch_gemms(problem, mode)


def torch_gemms(problem: Problem, mode: str):
    """The same GEMMs in torch, output in the input dtype."""
    logits = problem.hidden @ problem.weight.t()
    if mode != "nograd":
        logits @ problem.weight
    if mode in TRAINABLE_MODES:
        logits.t() @ problem.hidden


def ours(backend: str):
    def run(hidden, weight, targets):
        from autoregembed_fast import token_logprobs

        return token_logprobs(hidden, weight, targets, backend=backend)

    return run


def materialised(hidden, weight, targets):
    """What the released AutoRegEmbed code and a plain HF model do: all logits, log_softmax, gather."""
    from autoregembed_fast.ops import reference_token_logprobs

    return reference_token_logprobs(hidden, weight, targets)


def _chunk_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def chunked_eager(hidden, weight, targets):
    """TRL-style memory saving in plain torch: tokens in chunks, each chunk's logits recomputed in the
    backward (activation checkpointing), so one chunk of logits is alive at a time."""
    from torch.utils.checkpoint import checkpoint

    return torch.cat([
        checkpoint(_chunk_logprobs, hidden[start : start + CHUNK_TOKENS], weight,
                   targets[start : start + CHUNK_TOKENS], use_reentrant=False)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS)
    ])


def cut_cross_entropy(hidden, weight, targets):
    """Apple's Cut Cross-Entropy (its Triton kernels on a GPU, its torch.compile path on CPU)."""
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    return -linear_cross_entropy(hidden, weight, targets, reduction="none", impl=impl)


def liger_kernel(hidden, weight, targets):
    """Liger-Kernel's fused linear cross-entropy with per-token losses."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    # Positional: (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
    # label_smoothing, reduction)
    out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0,
                                                     0.0, "none")
    return -(out[0] if isinstance(out, tuple) else out)


def quack(hidden, weight, targets):
    """QuACK's linear cross-entropy (CuTe-DSL kernels, Hopper)."""
    from quack.linear_cross_entropy import linear_cross_entropy_func

    return -linear_cross_entropy_func(hidden, weight, None, targets, reduction="none")


# Scalar mean cross-entropy over the tokens (the "trainable-loss" mode), one per implementation that
# has such an entry point.
def ours_loss(backend: str):
    def run(hidden, weight, targets):
        from autoregembed_fast import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, shift=False, backend=backend)

    return run


def materialised_loss(hidden, weight, targets):
    return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets)


def chunked_eager_loss(hidden, weight, targets):
    return -chunked_eager(hidden, weight, targets).mean()


def cut_cross_entropy_loss(hidden, weight, targets):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if hidden.is_cuda else "torch_compile"
    return linear_cross_entropy(hidden, weight, targets, reduction="mean", impl=impl)


def liger_kernel_loss(hidden, weight, targets):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets, None, None, -100, 0.0,
                                                     0.0, "mean")
    return out[0] if isinstance(out, tuple) else out


def quack_loss(hidden, weight, targets):
    from quack.linear_cross_entropy import linear_cross_entropy_func

    return linear_cross_entropy_func(hidden, weight, None, targets, reduction="mean")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs_cuda(device: str, dtype: str) -> str | None:
    return None if device == "cuda" else "needs a CUDA GPU"


def needs_module(module: str, package: str, cuda_only: bool = False):
    def check(device: str, dtype: str) -> str | None:
        if cuda_only and device != "cuda":
            return f"needs a CUDA GPU ({package} has GPU kernels only)"
        if not _installed(module):
            return f"{package} is not installed (`make bench` installs the anchors)"
        return None

    return check


def ours_cuda_needs(device: str, dtype: str) -> str | None:
    if device != "cuda":
        return "needs a CUDA GPU"
    from autoregembed_fast.backends import cuda_extension_available

    return None if cuda_extension_available() else "autoregembed_fast._C was built without CUDA"


def needs_bf16_on_cpu(device: str, dtype: str) -> str | None:
    if device != "cpu" or dtype != "bfloat16":
        return "only for bf16 on CPU (elsewhere it is the GEMM floor itself)"
    return None


IMPLEMENTATIONS = {  # name: (per-token log-probs function, scalar-loss function, needs)
    "gemm-floor": (None, None, lambda device, dtype: None),
    "torch-bf16-gemms": (torch_gemms, torch_gemms, needs_bf16_on_cpu),
    "materialised": (materialised, materialised_loss, lambda device, dtype: None),
    "chunked-eager": (chunked_eager, chunked_eager_loss, lambda device, dtype: None),
    "cut-cross-entropy": (cut_cross_entropy, cut_cross_entropy_loss,
                          needs_module("cut_cross_entropy", "cut-cross-entropy")),
    "liger-kernel": (liger_kernel, liger_kernel_loss,
                     needs_module("liger_kernel", "liger-kernel", cuda_only=True)),
    "quack": (quack, quack_loss, needs_module("quack", "quack-kernels", cuda_only=True)),
    "ours-cpu": (ours("cpu"), ours_loss("cpu"), lambda device, dtype: None if device == "cpu" else "CPU backend"),
    "ours-chunked-triton": (ours("chunked-triton"), ours_loss("chunked-triton"), needs_cuda),
    "ours-fused-triton": (ours("fused-triton"), ours_loss("fused-triton"), needs_cuda),
    "ours-chunked-cuda": (ours("chunked-cuda"), ours_loss("chunked-cuda"), ours_cuda_needs),
}


# --------------------------------------------------------------------------------------------------
# One measurement (in its own process)


def run_once(impl, problem: Problem, mode: str):
    hidden, weight = problem.hidden, problem.weight
    if impl in (None, torch_gemms):
        with torch.no_grad():
            (impl or plain_gemms)(problem, mode)
        return None
    if mode == "nograd":
        with torch.no_grad():
            return impl(hidden, weight, problem.targets), None
    hidden.grad = weight.grad = None
    hidden.requires_grad_(True)
    weight.requires_grad_(mode in TRAINABLE_MODES)
    out = impl(hidden, weight, problem.targets)
    if mode == "trainable-loss":
        out.backward()
    else:
        out.backward(problem.grad_out)
    return out.detach(), hidden.grad


def oracle_error(problem: Problem, mode: str, out, grad_hidden) -> float:
    """Max abs error against the float64 oracle: of the first tokens' log-probs and grad_hidden, or
    (trainable-loss) of the mean loss over every token and the first tokens' grad_hidden."""
    k = ORACLE_TOKENS
    hidden, targets = problem.hidden[:k].detach(), problem.targets[:k]
    weight = problem.weight.detach()
    n_tokens = problem.targets.shape[0]
    if mode == "trainable-loss":
        total = sum(token_logprobs_oracle(problem.hidden[start : start + k].detach(), weight,
                                          problem.targets[start : start + k]).sum()
                    for start in range(0, n_tokens, k))
        error = abs(out.item() + total.item() / n_tokens)
        grad_out = torch.full((k,), -1.0 / n_tokens, device=hidden.device)
    else:
        error = (out[:k].double() - token_logprobs_oracle(hidden, weight, targets)).abs().max().item()
        grad_out = problem.grad_out[:k]
    if grad_hidden is not None:
        expected_grad, _, _ = oracle_grads(hidden, weight, targets, grad_out)
        error = max(error, (grad_hidden[:k].double() - expected_grad).abs().max().item())
    return error


def time_cpu(impl, problem, mode, repeats):
    run_once(impl, problem, mode)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run_once(impl, problem, mode)
        times.append(time.perf_counter() - start)
    # Memory of one more call, after the timing (PeakRss slows allocation down) and after warm-up, as
    # on the GPU: compilation, lazy imports (a custom op's first call imports torch._dynamo) and BLAS
    # buffers are one-time costs of the process, not of the op.
    del result
    problem.hidden.grad = problem.weight.grad = None
    with PeakRss() as peak:
        result = run_once(impl, problem, mode)
    return statistics.median(times), peak.extra_bytes, result


def time_cuda(impl, problem, mode, repeats):
    from triton.testing import do_bench

    result = run_once(impl, problem, mode)  # warm-up (and autotuning) outside the memory window
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    result = run_once(impl, problem, mode)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - baseline
    milliseconds = do_bench(lambda: run_once(impl, problem, mode), rep=max(100, 20 * repeats),
                            return_mode="median")
    return milliseconds / 1000, peak, result


def skip_reason(impl_name, device, dtype) -> str | None:
    """Why an implementation cannot run on `device` in `dtype` here (None when it can)."""
    return IMPLEMENTATIONS[impl_name][2](device, dtype)


def measure_problem(impl_name, mode, problem: Problem, repeats, device) -> dict:
    """Time, peak extra memory and oracle error of one implementation on one problem."""
    per_token, loss, _ = IMPLEMENTATIONS[impl_name]
    impl = loss if mode == "trainable-loss" else per_token
    timer = time_cuda if device == "cuda" else time_cpu
    seconds, peak_extra, result = timer(impl, problem, mode, repeats)
    error = None if impl in (None, torch_gemms) else oracle_error(problem, mode, *result)
    return {"seconds": seconds, "peak_extra_bytes": peak_extra, "max_abs_error": error}


def worker(impl_name, mode, n_tokens, dim, vocab, dtype, repeats, device) -> dict:
    reason = skip_reason(impl_name, device, dtype)
    if reason:
        return {"skipped": reason}
    problem = make_problem(n_tokens, dim, vocab, DTYPES[dtype], device)
    return measure_problem(impl_name, mode, problem, repeats, device)


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass
class Row:
    impl: str
    mode: str
    seconds: float | None = None
    tflops: float | None = None
    fraction_of_gemm_rate: float | None = None
    peak_extra_mb: float | None = None
    max_abs_error: float | None = None
    skipped: str | None = None


def run_in_subprocess(impl_name, mode, args, dim, vocab) -> dict:
    command = [
        sys.executable, "-m", "bench.op", "--worker", impl_name, "--mode", mode, "--n", str(args.n),
        "--dim", str(dim), "--vocab", str(vocab), "--dtype", args.dtype, "--repeats",
        str(args.repeats), "--device", args.device,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed without a message"]
        return {"skipped": f"failed: {lines[-1][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, dim, vocab) -> list[Row]:
    rows = []
    for mode in args.modes:
        flops = GEMMS_PER_MODE[mode] * 2 * args.n * dim * vocab
        floor = run_in_subprocess("gemm-floor", mode, args, dim, vocab)
        for impl_name in args.impls:
            measured = floor if impl_name == "gemm-floor" else run_in_subprocess(
                impl_name, mode, args, dim, vocab)
            if "skipped" in measured:
                rows.append(Row(impl_name, mode, skipped=measured["skipped"]))
                continue
            rows.append(Row(
                impl=impl_name, mode=mode, seconds=measured["seconds"],
                tflops=flops / measured["seconds"] / 1e12,
                fraction_of_gemm_rate=floor["seconds"] / measured["seconds"],
                peak_extra_mb=measured["peak_extra_bytes"] / 2**20,
                max_abs_error=measured["max_abs_error"],
            ))
    return rows


def print_table(rows: list[Row]) -> None:
    print("| mode | implementation | time (s) | TFLOP/s | of GEMM rate | peak extra (MB) | max abs err |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.skipped:
            print(f"| {r.mode} | {r.impl} | skipped: {r.skipped} | | | | |")
            continue
        error = "n/a" if r.max_abs_error is None else f"{r.max_abs_error:.1e}"
        print(f"| {r.mode} | {r.impl} | {r.seconds:.3f} | {r.tflops:.3f} | "
              f"{r.fraction_of_gemm_rate:.0%} | {r.peak_extra_mb:.0f} | {error} |")


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not r.skipped]
    modes = [m for m in MODES if any(r.mode == m for r in measured)]
    figure, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 6.5), squeeze=False)
    for column, mode in enumerate(modes):
        entries = [r for r in measured if r.mode == mode]
        names = [r.impl for r in entries]
        for row, (values, label) in enumerate(((
                [r.seconds for r in entries], "time (s)"),
                ([r.peak_extra_mb for r in entries], "peak extra memory (MB)"))):
            axis = axes[row][column]
            axis.barh(names, values, color=["tab:orange" if n.startswith("ours") else "tab:blue"
                                             for n in names])
            axis.set_xlabel(label)
            axis.invert_yaxis()
            if row == 0:
                axis.set_title(mode)
    figure.suptitle(title, wrap=True, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cpu_gemm_dtype(dtype: str) -> str:
    """How the CPU backend runs this dtype's GEMMs here (decided once per process)."""
    if dtype != "bfloat16":
        return f"{dtype} GEMMs"
    from autoregembed_fast.backends import CPU_BF16_GEMM_ENV, cpu_bf16_gemm

    if cpu_bf16_gemm():
        return f"bf16 GEMMs with fp32 output (AVX512-BF16; {CPU_BF16_GEMM_ENV}=0 upcasts)"
    return "bf16 upcast to fp32 GEMMs (no AVX512-BF16 here, or " + CPU_BF16_GEMM_ENV + "=0)"


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m bench.op", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--n", type=int, default=4096, help="scored tokens per call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float32 on CPU, bfloat16 on a GPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=sorted(IMPLEMENTATIONS),
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.n, args.dim, args.vocab, args.dtype,
                                args.repeats, args.device)))
        return []

    dim, vocab = PRESETS[args.preset]
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"CPU, {torch.get_num_threads()} threads, {cpu_gemm_dtype(args.dtype)}")
    title = (f"token_logprobs, {args.preset}: N={args.n} d={dim} V={vocab} {args.dtype} on "
             f"{machine}; median of {args.repeats} after warm-up")
    print(title)
    rows = measure(args, dim, vocab)
    print_table(rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"op-{args.device}-{args.preset}-N{args.n}-{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"title": title, "preset": args.preset, "n": args.n, "dim": dim, "vocab": vocab,
         "dtype": args.dtype, "device": args.device, "machine": machine,
         "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, stem.with_suffix(".png"), title)
    print(f"wrote {stem.relative_to(ROOT)}.json and .png")
    return rows


if __name__ == "__main__":
    main()
