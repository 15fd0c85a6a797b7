"""numba, when it is installed and not disabled: the compiled hot paths' one import point.

``GUARD_JIT=0`` (or ``false``/``no``/``off``) in the environment disables it; without numba the
checks' kernels (:mod:`guard.online.checks`) run uncompiled as numpy, with the same results, slower.
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


def compiled(**options):
    """``njit`` with its on-disk cache where one can be written, without it elsewhere.

    numba caches next to the source file, else under ``NUMBA_CACHE_DIR`` or the user's cache
    directory; where none is writable (a read-only install run by a user without a home, as some
    serving images are) ``cache=True`` raises at import time. Then every process compiles once
    instead (a second or two at the handler's warm-up), and guard still imports.
    """
    def wrap(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:
            return njit(cache=False, **options)(fn)
    return wrap
