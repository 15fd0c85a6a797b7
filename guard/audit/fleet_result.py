"""The result of a fleet audit (:func:`guard.audit.fleet.run_fleet`): its rows in the models' order, what ran them
and the exit code they add up to. Its own module so that the fleet's runner and its reports
(:mod:`guard.audit.fleet_report`) both read it without importing each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FleetResult:
    """The rows of a fleet audit in the order the models were given, and what ran them."""

    rows: list[dict[str, Any]]
    executor: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    duplicates_dropped: int = 0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the run started (for the progress line's estimate while it runs)."""
        return time.perf_counter() - self.started

    @property
    def counts(self) -> dict[str, int]:
        out = {"clean": 0, "backdoored": 0, "error": 0}
        for r in self.rows:
            out[r["verdict"]] += 1
        return out

    @property
    def exit_code(self) -> int:
        """The worst row's: 0 every model clean, 1 a backdoor suspected, 2 a model that could not be audited."""
        return max((r["exit_code"] for r in self.rows), default=0)
