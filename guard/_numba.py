"""numba, when it is installed and not disabled: the compiled hot paths' one import point.

``GUARD_JIT=0`` (or ``false``/``no``/``off``) in the environment disables it; without numba every
compiled path has a numpy twin that gives the same results, a few tens of microseconds slower per call.
"""

from __future__ import annotations

import os

njit = None
if os.environ.get("GUARD_JIT", "1").strip().lower() not in ("0", "false", "no", "off"):
    try:
        from numba import njit
    except ImportError:  # pragma: no cover - depends on the environment
        njit = None


def available() -> bool:
    """Whether the compiled paths are used in this process."""
    return njit is not None
