"""guard._malloc: the allocator setting every CLI command applies, measured in fresh processes."""

from __future__ import annotations

import subprocess
import sys

SNIPPET = """
import resource, sys
import numpy as np
from guard._malloc import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # a second call is a no-op
def cycle():  # a 48 MB buffer allocated, written and freed, as a scan's batch activations are at every step
    a = np.empty(12_000_000, np.float32)
    a.fill(1.0)
    del a
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SNIPPET, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_freed_large_buffers_are_reused_instead_of_faulted_in_again():
    # above glibc's largest mmap threshold (32 MiB) every buffer is a fresh mapping, faulted in again at every
    # cycle (hundreds to thousands of faults per cycle, fewer where the kernel hands out huge pages); with the
    # thresholds raised the freed heap is reused
    default, retained = _faults("default"), _faults("retain")
    assert default >= 100, default
    assert retained < default / 10, (retained, default)
