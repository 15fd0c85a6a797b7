"""A dependency-free progress bar on stderr (silent when stderr is not a terminal unless forced)."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """``with Progress("nc", total) as p: p.update(n, note)``; draws on stderr, never on stdout."""

    def __init__(self, label: str, total: int, *, enabled: bool | None = None):
        self.label, self.total, self.n = label, max(int(total), 1), 0
        if enabled is None:
            enabled = sys.stderr.isatty() or os.environ.get("GUARD_PROGRESS") == "1"
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.n = min(self.n + n, self.total)
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and self.n < self.total):
            return
        self._last = now
        width = 28
        done = int(width * self.n / self.total)
        sys.stderr.write(f"\r{self.label:>8} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                         f"{now - self._t0:5.1f}s {note[:40]:<40}")
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.update(0)
            sys.stderr.write("\n")
            sys.stderr.flush()
