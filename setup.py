"""Build of autoregembed_fast: the Python package, its Triton kernels and the C++ extension `_C`.

`kernels/` at the repository root is installed as the subpackage `autoregembed_fast.kernels` (a
top-level `kernels` package would clash with an unrelated project on PyPI). The extension is built with
ninja; install with `pip install --no-build-isolation .` once torch is installed, so that it compiles
against that torch. CPU sources always; the CUDA epilogue (`*_cuda.cu` + its `*_cuda.cpp` glue) only
when the installed torch has CUDA and nvcc is found, unless `AEF_BUILD_CUDA=0` asks for the CPU
sources alone (what `make gpu` falls back to when the CUDA build fails).
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# -fno-trapping-math / -fno-math-errno let gcc vectorise the epilogue's clamps and exp without
# changing IEEE results (unlike -ffast-math, which would break the non-finite checks).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
# No --use_fast_math: the kernels rely on IEEE expf/tanhf and NaN propagation.
NVCC_FLAGS = ["-O3", "-std=c++17"]


def relative(paths):
    return sorted(str(path.relative_to(ROOT)) for path in paths)


def extension():
    cpu_sources = [p for p in CSRC.glob("*.cpp") if not p.stem.endswith("_cuda")]
    common = dict(name="autoregembed_fast._C", include_dirs=[str(CSRC)],
                  extra_link_args=["-fopenmp"])
    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("AEF_BUILD_CUDA") == "0":
        return CppExtension(sources=relative(cpu_sources), extra_compile_args={"cxx": CXX_FLAGS},
                            **common)
    # Ampere and Hopper unless the user asks for other architectures.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cuda_sources = list(CSRC.glob("*_cuda.cpp")) + list(CSRC.glob("*.cu"))
    return CUDAExtension(
        sources=relative(cpu_sources + cuda_sources),
        define_macros=[("AEF_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        **common,
    )


setup(
    packages=["autoregembed_fast", "autoregembed_fast.kernels", "autoregembed_fast.method",
              "autoregembed_fast.method.training"],
    package_dir={"autoregembed_fast": "autoregembed_fast", "autoregembed_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
