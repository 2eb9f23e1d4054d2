"""The benchmark commands' plumbing that runs without a GPU: `make gpu` on a machine without one, and
the GPU report (Markdown table, JSON-ready rows, chart) from rows in the shape the benchmark makes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from bench import gpu  # noqa: E402


@pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
@pytest.mark.skipif(gpu.gpu_or_none() is not None, reason="this machine has a GPU")
def test_make_gpu_without_a_gpu_says_so_in_one_line(tmp_path):
    done = subprocess.run(["make", "--no-print-directory", "gpu", f"PYTHON={sys.executable}",
                           f"RESULTS={tmp_path / 'results'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "results").exists()


def sample_rows():
    rows = []
    for mode, seconds in (("nograd", 0.010), ("frozen", 0.021)):
        for impl, factor in (("gemm-floor", 1.0), ("ours-chunked-triton", 1.1)):
            rows.append({"preset": "llama3-8b", "dtype": "bfloat16", "mode": mode, "impl": impl,
                         "n": 8192, "dim": 4096, "vocab": 128_256, "seconds": seconds * factor,
                         "tflops": 1.0, "of_gemm_rate": 1 / factor, "peak_extra_mb": 64.0,
                         "max_abs_error": None if impl == "gemm-floor" else 1e-3})
    rows.append({"preset": "llama3-8b", "dtype": "bfloat16", "mode": "frozen", "impl": "quack",
                 "n": 8192, "dim": 4096, "vocab": 128_256, "skipped": "quack-kernels is not installed"})
    return rows


def test_gpu_report_holds_every_row(tmp_path):
    rows = sample_rows()
    facts = {"device": "NVIDIA H100", "torch": "2.11", "tests": "passed"}
    gpu.write_markdown(tmp_path / "gpu.md", facts, rows)
    table = (tmp_path / "gpu.md").read_text()
    assert table.count("| llama3-8b | bfloat16 |") == len(rows)
    assert "| frozen | ours-chunked-triton | 23.10 |" in table  # 0.021 s * 1.1 in milliseconds
    assert "91%" in table and "skipped: quack-kernels is not installed" in table
    gpu.plot(tmp_path / "gpu.png", facts, rows)
    assert (tmp_path / "gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_filtering_tile_maxima_against_loops():
    import torch

    from bench.gradient_filtering import tile_maxima

    hidden, weight = torch.randn(10, 8) * 2, torch.randn(37, 8)
    maxima = tile_maxima(hidden, weight, 4, 8)  # 3 token tiles (4, 4, 2) x 5 vocabulary tiles (last 5)
    probs = torch.softmax(hidden.double() @ weight.double().t(), dim=-1)
    assert maxima.shape == (3, 5)
    for i, tokens in enumerate((range(0, 4), range(4, 8), range(8, 10))):
        for j in range(5):
            expected = max(probs[t, v].item() for t in tokens for v in range(8 * j, min(8 * j + 8, 37)))
            assert abs(maxima[i, j].item() - expected) <= 1e-6

