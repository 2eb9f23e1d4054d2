"""`make gpu`: everything that needs a CUDA GPU, in one command that fits one 10-minute run on an H100.

1. Builds the package in place (editable) against the Python that runs this, offline: first with the
   CUDA extension, and if that fails, without it (saying why; the `cuda` backend is then skipped).
2. Runs the whole test suite on CUDA tensors (TRITON_INTERPRET=0), in parallel when pytest-xdist is
   installed (the Triton compiles dominate).
3. Benchmarks the op on the GPU in this process: presets smollm2-135m, llama2-7b and llama3-8b at
   N = 8192, bf16 then fp32, no-grad / frozen head / trainable head, against the cuBLAS GEMMs of the
   same work (1 / 2 / 3 GEMMs), the materialised and chunked eager paths, and Cut Cross-Entropy,
   Liger-Kernel and QuACK when importable. Rows that do not fit the time budget are listed as skipped.
4. Writes gpu.json, gpu.md and gpu.png (and the build and test logs) into the results folder.

Without a CUDA GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "bench" / "results" / "gpu"
PRESET_ORDER = ("llama3-8b", "llama2-7b", "smollm2-135m")  # the headline shape first
DTYPE_ORDER = ("bfloat16", "float32")
GPU_IMPLS = ("gemm-floor", "ours-chunked-triton", "ours-fused-triton", "ours-chunked-cuda",
             "cut-cross-entropy", "liger-kernel", "quack", "materialised", "chunked-eager")


def gpu_or_none() -> str | None:
    """The GPU's name, or None (with no torch or no CUDA device)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def run_logged(command, log: Path, env=None, timeout=None) -> int:
    """Runs `command` with its output into `log` (and echoes the last lines); returns its status."""
    print("$", " ".join(command), flush=True)
    with log.open("w") as out:
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  env=env, timeout=timeout)
            status = done.returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n(stopped after {timeout} s)\n")
            status = 124
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    print("\n".join("    " + line for line in tail), flush=True)
    return status


def build(results: Path, wheels: Path | None) -> str:
    """Editable build against this Python, offline. Returns what was built, in words."""
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
    if wheels is not None:
        anchors = sorted(wheels.glob("*.whl"))
        if anchors:
            run_logged(pip + [str(w) for w in anchors], results / "wheels.log")
    if run_logged(pip + ["-e", "."], results / "build.log") == 0:
        return "with the CUDA extension"
    reason = next((line for line in reversed(
        (results / "build.log").read_text(errors="replace").splitlines()) if "error" in line.lower()),
        "see build.log")
    print(f"make gpu: the build with the CUDA extension failed ({reason.strip()[:200]}); "
          "building without it: the `cuda` backend will be skipped", flush=True)
    status = run_logged(pip + ["-e", "."], results / "build-cpu-only.log",
                        env={**os.environ, "AEF_BUILD_CUDA": "0"})
    if status != 0:
        raise SystemExit("make gpu: the package does not build; see build-cpu-only.log")
    return f"without the CUDA extension ({reason.strip()[:200]})"


def run_tests(results: Path, timeout: int) -> int:
    import importlib.util

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(min(8, os.cpu_count() or 1))]
    return run_logged(command, results / "pytest.log", env=env, timeout=timeout)


def benchmark(args, deadline: float) -> list[dict]:
    """Every (preset, dtype, mode, implementation) row, measured in this process while time is left."""
    import torch

    from bench import op

    rows = []
    for dtype in DTYPE_ORDER:
        for preset in PRESET_ORDER:
            dim, vocab = op.PRESETS[preset]
            problem = None
            for mode in op.MODES:
                floor_seconds = None
                for impl_name in GPU_IMPLS:
                    row = {"preset": preset, "dtype": dtype, "mode": mode, "impl": impl_name,
                           "n": args.n, "dim": dim, "vocab": vocab}
                    reason = op.skip_reason(impl_name, "cuda", dtype)
                    if reason is None and time.monotonic() > deadline:
                        reason = "the time budget of `make gpu` ran out before this row"
                    if reason is None:
                        try:
                            if problem is None:
                                problem = op.make_problem(args.n, dim, vocab, op.DTYPES[dtype],
                                                          "cuda")
                            row.update(op.measure_problem(impl_name, mode, problem, args.repeats,
                                                          "cuda"))
                        except Exception as error:  # an anchor that fails here is a row, not a crash
                            reason = f"failed: {type(error).__name__}: {str(error)[:200]}"
                        finally:
                            if problem is not None:
                                problem.hidden.grad = problem.weight.grad = None
                            torch.cuda.empty_cache()
                    if reason is not None:
                        row["skipped"] = reason
                    else:
                        if impl_name == "gemm-floor":
                            floor_seconds = row["seconds"]
                        flops = op.GEMMS_PER_MODE[mode] * 2 * args.n * dim * vocab
                        row["tflops"] = flops / row["seconds"] / 1e12
                        row["of_gemm_rate"] = (floor_seconds / row["seconds"]
                                               if floor_seconds else None)
                        row["peak_extra_mb"] = row.pop("peak_extra_bytes") / 2**20
                    rows.append(row)
                    print(format_row(row), flush=True)
            del problem
            torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    head = f"| {row['preset']} | {row['dtype']} | {row['mode']} | {row['impl']} |"
    if "skipped" in row:
        return f"{head} skipped: {row['skipped']} | | | | |"
    rate = "n/a" if row["of_gemm_rate"] is None else f"{row['of_gemm_rate']:.0%}"
    error = "n/a" if row["max_abs_error"] is None else f"{row['max_abs_error']:.1e}"
    return (f"{head} {row['seconds'] * 1e3:.2f} | {row['tflops']:.0f} | {rate} | "
            f"{row['peak_extra_mb']:.0f} | {error} |")


TABLE_HEADER = ("| preset | dtype | mode | implementation | time (ms) | TFLOP/s | of GEMM rate | "
                "peak extra (MB) | max abs err |\n|---|---|---|---|---|---|---|---|---|")


def write_markdown(path: Path, facts: dict, rows: list[dict]) -> None:
    lines = [f"# `make gpu` on {facts['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items() if key != "device"]
    lines += ["", TABLE_HEADER] + [format_row(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, facts: dict, rows: list[dict]) -> None:
    """Time relative to the GEMM floor, one panel per (preset, dtype), grouped by mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, d) for d in DTYPE_ORDER for p in PRESET_ORDER
              if any(r["preset"] == p and r["dtype"] == d and "skipped" not in r for r in rows)]
    if not panels:
        return
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for axis, (preset, dtype) in zip(axes[:, 0], panels):
        measured = [r for r in rows if r["preset"] == preset and r["dtype"] == dtype
                    and "skipped" not in r and r["of_gemm_rate"]]
        labels = [f"{r['mode']} · {r['impl']}" for r in measured]
        axis.barh(labels, [1 / r["of_gemm_rate"] for r in measured],
                  color=["tab:orange" if r["impl"].startswith("ours") else "tab:blue"
                         for r in measured])
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_xlabel("time / GEMM floor (lower is better)")
        axis.set_title(f"{preset}, {dtype}, N={rows[0]['n']}", fontsize=9)
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=7)
    figure.suptitle(f"token_logprobs on {facts['device']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a folder of wheels to install offline first (the anchors)")
    parser.add_argument("--n", type=int, default=8192, help="scored tokens per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=540,
                        help="wall-clock budget for the whole command; the benchmark stops there")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()

    device = gpu_or_none()
    if device is None:
        print(f"make gpu: no CUDA GPU is visible to {sys.executable}; nothing to do here.")
        return 0
    args.results.mkdir(parents=True, exist_ok=True)
    built = "skipped (--skip-build)" if args.skip_build else build(args.results, args.wheels)
    tests = "skipped (--skip-tests)"
    if not args.skip_tests:
        # The tests may take up to half of what is left; the benchmark has the rest.
        left = args.budget_s - (time.monotonic() - started)
        status = run_tests(args.results, timeout=max(60, int(left / 2)))
        tests = "passed" if status == 0 else f"FAILED (pytest exit {status}; see pytest.log)"
        print(f"make gpu: tests {tests}", flush=True)

    import torch
    import triton

    facts = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
             "triton": triton.__version__, "python": platform.python_version(),
             "build": built, "tests": tests, "n": args.n,
             "timing": "triton.testing.do_bench median after a warm-up call (autotuning included "
                       "in the warm-up); peak extra = max_memory_allocated above the allocation "
                       "before the measured call"}
    print(TABLE_HEADER, flush=True)
    rows = benchmark(args, deadline=started + args.budget_s)
    facts["wall_s"] = round(time.monotonic() - started)
    (args.results / "gpu.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    write_markdown(args.results / "gpu.md", facts, rows)
    plot(args.results / "gpu.png", facts, rows)
    print(f"make gpu: wrote gpu.json, gpu.md and gpu.png into {args.results}", flush=True)
    return 0 if tests == "passed" or args.skip_tests else 1


if __name__ == "__main__":
    sys.exit(main())
