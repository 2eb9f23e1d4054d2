"""bench.memory.PeakRss measures what a block allocates, even where glibc would hand it freed heap
blocks whose pages are still resident (run in a subprocess: PeakRss changes the process's allocator
settings)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import torch
from bench.memory import PeakRss
freed = torch.ones(30 << 18)
del freed  # a freed mmapped block raises glibc's mmap threshold to its 30 MiB
blocks = [torch.ones(1 << 18) for _ in range(200)]  # 1 MiB each, now from the heap
last = blocks[-1]
del blocks  # 199 MiB freed below a live block: the heap keeps those pages
with PeakRss() as reused:
    kept = [torch.ones(1 << 18) for _ in range(100)]
with PeakRss() as nothing:
    pass
print(reused.extra_bytes / 2**20, nothing.extra_bytes / 2**20)
"""


def test_peak_rss_counts_allocations_that_reuse_freed_heap_blocks():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    reused, nothing = map(float, done.stdout.split())
    assert 99 <= reused <= 104  # without releasing the free blocks' pages first: 0
    assert nothing < 1
