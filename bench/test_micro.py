"""pytest-benchmark micro-benchmarks of the op's CPU-side backends (not part of CI's run, which
collects tests/ only): `.venv/bin/python -m pytest bench/test_micro.py`."""

import pytest
import torch

from autoregembed_fast import token_logprobs

N, D, V = 1024, 576, 16_384


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) * D**-0.5
    targets = torch.randint(0, V, (N,), generator=generator)
    return hidden, weight, targets, torch.randn(N, generator=generator)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_no_grad(benchmark, problem, backend):
    hidden, weight, targets, _ = problem
    with torch.no_grad():
        benchmark(token_logprobs, hidden, weight, targets, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_frozen_head_forward_backward(benchmark, problem, backend):
    hidden, weight, targets, grad_out = problem
    hidden = hidden.clone().requires_grad_()

    def step():
        hidden.grad = None
        token_logprobs(hidden, weight, targets, backend=backend).backward(grad_out)

    benchmark(step)
