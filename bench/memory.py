"""Peak-memory measurement for CPU benchmarks: each implementation runs in its own process, and its
peak is the RSS high-water mark above the RSS at the start of the measured region."""

from pathlib import Path


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRss:
    """Context manager: `extra_bytes` = peak RSS inside the block minus the RSS on entry (the kernel's
    high-water mark is reset on entry through /proc/self/clear_refs)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.baseline_kib = proc_status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_bytes = (proc_status_kib("VmHWM") - self.baseline_kib) * 1024
        return False
