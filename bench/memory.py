"""Peak-memory measurement for CPU benchmarks: each implementation runs in its own process, and its
peak is the RSS high-water mark above the RSS at the start of the measured region.

RSS follows live memory only if freed blocks go back to the system: glibc keeps freed blocks of up
to 32 MiB in its heap by default, and a later allocation reusing them never shows in the high-water
mark. So on entry glibc releases the pages of its free blocks (malloc_trim) and from then on serves
every allocation of 64 KiB or more by mmap, returned on free. That makes allocation slower (fresh
pages each time): time before measuring.
"""

import ctypes
import ctypes.util
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 64 * 1024


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def return_freed_blocks_to_the_system() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak RSS would not follow live memory")
    libc.malloc_trim(0)


class PeakRss:
    """Context manager: `extra_bytes` = peak RSS inside the block minus the RSS on entry (the kernel's
    high-water mark is reset on entry through /proc/self/clear_refs)."""

    def __enter__(self):
        return_freed_blocks_to_the_system()
        Path("/proc/self/clear_refs").write_text("5")
        self.baseline_kib = proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_bytes = (proc_status_kib("VmHWM") - self.baseline_kib) * 1024
        return False
