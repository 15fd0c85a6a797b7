"""Keep large freed buffers in the process instead of handing each back to the operating system.

glibc serves an allocation above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with a
mapping of its own and unmaps it on free, and trims the heap's top when more than 128 KiB is free. A
scan frees and reallocates the same activation and gradient buffers at every optimisation step, so every
step faults them in again, page by page: a scan of the demo model spent 11.6 s of system time in 42 s of
wall time, and Neural Cleanse at 224x224 1.8 s of 4.5 (docs/benchmarks.md, 'Measurements behind the
defaults'). With both thresholds at 1 GiB freed buffers are reused; the process keeps its peak heap,
which it would reach again at the next step anyway. Nothing happens where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
LIMIT = 1 << 30
_done = False


def retain_freed_memory(limit: int = LIMIT) -> bool:
    """Raise glibc's mmap and trim thresholds to ``limit`` bytes for this process (once); True when applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, int(limit))) and bool(mallopt(_M_TRIM_THRESHOLD, int(limit)))
    return _done
