"""What the machine's CPU can do fast: native bf16 matrix instructions or not.

On CPUs with AMX (Sapphire Rapids and later) or AVX512-BF16 (recent AMD EPYC), torch's bf16 GEMMs
run faster than fp32 (measured: a SmolLM2-135M stage-1 step 1.43x faster under bf16 autocast on an
AMD EPYC with AVX512-BF16); on AVX2-only CPUs they are a scalar fallback, ~160x slower than fp32.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's native bf16 matrix-instruction flags (AMX, AVX512-BF16); empty: bf16 is emulated."""
    flags = cpu_flags(cpuinfo)
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
