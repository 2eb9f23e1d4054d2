"""Which backends the op tests run here, and where their inputs live (shared by the op and loss
tests)."""

import torch

from autoregembed_fast import backends
from autoregembed_fast.kernels import INTERPRETING


def backend_device(backend: str) -> str:
    """Where a backend's inputs live in these tests: the Triton backends run on CPU tensors under the
    interpreter (TRITON_INTERPRET=1, the default of conftest.py) and on CUDA tensors otherwise."""
    if backend in ("reference", "cpu") or (backend.endswith("triton") and INTERPRETING):
        return "cpu"
    return "cuda"


def backend_runs_here(backend: str) -> bool:
    if backend_device(backend) == "cpu":
        return True
    if not torch.cuda.is_available():
        return False
    return backend != "chunked-cuda" or backends.cuda_extension_available()


# On a GPU machine, `TRITON_INTERPRET=0 pytest` runs the compiled Triton kernels and the CUDA backend.
BACKENDS = [b for b in ("reference", "cpu", "chunked-triton", "fused-triton", "chunked-cuda")
            if backend_runs_here(b)]
