"""Benchmark of the token log-likelihood op: time, peak memory and error of each implementation.

Each (implementation, mode) runs in a fresh subprocess, so its peak memory is its own: on CPU the peak
RSS above the RSS just before the first call (the kernel's high-water mark is reset there through
/proc/self/clear_refs). The machine's GEMM rate for the same shape is measured in the same run as one
more "implementation" (the plain GEMMs that the op must at least do), and each row reports the
fraction of that rate it reaches. Errors are against the float64 oracle of tests/oracle.py on the
first tokens, so that a fast but wrong entry shows.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

PRESETS = {  # name: (d, V), ../shared/SPEC.md §3
    "smollm2-135m": (576, 49_152),
    "llama2-7b": (4_096, 32_000),
    "llama3-8b": (4_096, 128_256),
}
MODES = ("nograd", "frozen", "trainable")
# GEMM-equivalents (2*N*d*V FLOPs each) the work of each mode needs: the logits; plus the Jacobian
# (frozen head, grad_hidden only); plus grad_hidden and grad_weight (trainable head).
GEMMS_PER_MODE = {"nograd": 1, "frozen": 2, "trainable": 3}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ORACLE_TOKENS = 128


@dataclass
class Problem:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad_out: torch.Tensor


def make_problem(n_tokens: int, dim: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=generator)
    weight = torch.randn(vocab, dim, generator=generator) * (2.0 / dim**0.5)
    targets = torch.randint(0, vocab, (n_tokens,), generator=generator)
    grad_out = torch.randn(n_tokens, generator=generator)
    return Problem(hidden.to(dtype), weight.to(dtype), targets, grad_out)


def plain_gemms(problem: Problem, mode: str):
    """The GEMMs the op cannot avoid, at full size: the floor the fused implementations aim at."""
    logits = problem.hidden @ problem.weight.t()
    if mode != "nograd":
        logits @ problem.weight
    if mode == "trainable":
        logits.t() @ problem.hidden
    return None


def token_logprobs_with(backend: str):
    def run(hidden, weight, targets):
        from autoregembed_fast import token_logprobs

        return token_logprobs(hidden, weight, targets, backend=backend)

    return run


IMPLEMENTATIONS = {
    "gemm-floor": None,  # plain_gemms, handled apart
    "materialised": token_logprobs_with("reference"),
    "ours-cpu": token_logprobs_with("cpu"),
}


def run_once(impl, problem: Problem, mode: str):
    hidden, weight = problem.hidden, problem.weight
    if impl is None:
        with torch.no_grad():
            return plain_gemms(problem, mode)
    if mode == "nograd":
        with torch.no_grad():
            return impl(hidden, weight, problem.targets), None
    hidden.grad = weight.grad = None
    hidden.requires_grad_(True)
    weight.requires_grad_(mode == "trainable")
    logp = impl(hidden, weight, problem.targets)
    logp.backward(problem.grad_out)
    return logp.detach(), hidden.grad


def oracle_error(problem: Problem, logp, grad_hidden) -> float:
    sys.path.insert(0, str(ROOT / "tests"))
    from oracle import oracle_grads, token_logprobs_oracle

    k = ORACLE_TOKENS
    hidden, targets = problem.hidden[:k].detach(), problem.targets[:k]
    weight = problem.weight.detach()
    error = (logp[:k].double() - token_logprobs_oracle(hidden, weight, targets)).abs().max().item()
    if grad_hidden is not None:
        expected_grad, _, _ = oracle_grads(hidden, weight, targets, problem.grad_out[:k])
        error = max(error, (grad_hidden[:k].double() - expected_grad).abs().max().item())
    return error


def worker(impl_name: str, mode: str, n_tokens: int, dim: int, vocab: int, dtype: str,
           repeats: int) -> dict:
    """Runs in its own process: times one implementation and reports its peak memory and error."""
    problem = make_problem(n_tokens, dim, vocab, DTYPES[dtype])
    impl = IMPLEMENTATIONS[impl_name]
    with PeakRss() as peak:
        result = run_once(impl, problem, mode)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = run_once(impl, problem, mode)
            times.append(time.perf_counter() - start)
    error = None if impl is None else oracle_error(problem, *result)
    return {"seconds": statistics.median(times), "peak_extra_bytes": peak.extra_bytes,
            "max_abs_error": error}


@dataclass
class Row:
    impl: str
    mode: str
    seconds: float
    tflops: float
    fraction_of_gemm_rate: float
    peak_extra_mb: float
    max_abs_error: float | None


def run_in_subprocess(impl_name, mode, args, dim, vocab) -> dict:
    command = [
        sys.executable, "-m", "bench.op", "--worker", impl_name, "--mode", mode,
        "--n", str(args.n), "--dim", str(dim), "--vocab", str(vocab), "--dtype", args.dtype,
        "--repeats", str(args.repeats),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    if completed.returncode != 0:
        return {"skipped": completed.stderr.strip().splitlines()[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--n", type=int, default=4096, help="scored tokens per call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--impls", nargs="+", choices=sorted(IMPLEMENTATIONS),
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, args.n, args.dim, args.vocab, args.dtype,
                                args.repeats)))
        return []

    dim, vocab = PRESETS[args.preset]
    print(f"token_logprobs on CPU ({torch.get_num_threads()} threads), preset {args.preset}: "
          f"N={args.n} d={dim} V={vocab} {args.dtype}, median of {args.repeats} after warm-up")
    rows = []
    for mode in args.modes:
        flops = GEMMS_PER_MODE[mode] * 2 * args.n * dim * vocab
        floor = run_in_subprocess("gemm-floor", mode, args, dim, vocab)
        for impl_name in args.impls:
            measured = floor if impl_name == "gemm-floor" else run_in_subprocess(
                impl_name, mode, args, dim, vocab)
            if "skipped" in measured:
                print(f"  {mode:9s} {impl_name:14s} skipped: {measured['skipped']}")
                continue
            rows.append(Row(
                impl=impl_name, mode=mode, seconds=measured["seconds"],
                tflops=flops / measured["seconds"] / 1e12,
                fraction_of_gemm_rate=floor["seconds"] / measured["seconds"],
                peak_extra_mb=measured["peak_extra_bytes"] / 2**20,
                max_abs_error=measured["max_abs_error"],
            ))
    print_table(rows)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"op-cpu-{args.preset}-N{args.n}-{args.dtype}.json"
    out.write_text(json.dumps({"preset": args.preset, "n": args.n, "dim": dim, "vocab": vocab,
                               "dtype": args.dtype, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"| {'mode':9s} | {'implementation':14s} | {'time (s)':>8s} | {'TFLOP/s':>7s} | " \
             f"{'of GEMM rate':>12s} | {'peak extra (MB)':>15s} | {'max abs err':>11s} |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for r in rows:
        error = "n/a" if r.max_abs_error is None else f"{r.max_abs_error:.1e}"
        print(f"| {r.mode:9s} | {r.impl:14s} | {r.seconds:8.3f} | {r.tflops:7.3f} | "
              f"{r.fraction_of_gemm_rate:12.0%} | {r.peak_extra_mb:15.0f} | {error:>11s} |")


if __name__ == "__main__":
    main()
