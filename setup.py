"""Build of autoregembed_fast: the Python package, its Triton kernels and the C++ extension `_C`.

`kernels/` at the repository root is installed as the subpackage `autoregembed_fast.kernels` (a
top-level `kernels` package would clash with an unrelated project on PyPI). The extension is built with
ninja; install with `pip install --no-build-isolation .` once torch is installed, so that it compiles
against that torch.
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"

# -fno-trapping-math / -fno-math-errno let gcc vectorise the epilogue's clamps and exp without
# changing IEEE results (unlike -ffast-math, which would break the non-finite checks).
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]


def cpu_extension():
    sources = sorted(str(path.relative_to(ROOT)) for path in CSRC.glob("*.cpp"))
    return CppExtension(
        name="autoregembed_fast._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["autoregembed_fast", "autoregembed_fast.kernels"],
    package_dir={"autoregembed_fast": "autoregembed_fast", "autoregembed_fast.kernels": "kernels"},
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
