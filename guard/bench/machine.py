"""The machine a run measures on: its facts for the results, its CPU time, how many torch threads to use."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import numpy as np
import torch


def machine_facts() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__,
            "load_average_1m_at_start": round(load[0], 2) if load else None}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes, not TorchServe's JVM).

    On a shared machine wall time says little; CPU seconds over the core count bound what the same
    run takes on an idle one."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def choose_threads(requested: int | None) -> tuple[int, str]:
    """Torch threads for the run: as requested, else 1 on a busy machine and all cores on an idle one.

    On cores shared with other work, OpenMP's spinning threads made a forward pass many times slower
    with one thread per core than with a single thread, so a loaded machine runs single-threaded
    (figures: docs/benchmarks.md, 'Measurements behind the defaults').
    """
    if requested:
        return int(requested), "--threads"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= 0.5 * cores:
        return 1, f"load average {load:.1f} on {cores} cores: 1 thread (oversubscribed OpenMP spins)"
    return cores, f"load average {load:.1f} on {cores} cores: idle enough for {cores} threads"
