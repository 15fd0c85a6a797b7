"""Where the guard's counters go: a small sink protocol and an in-memory sink.

The metric names and labels are a contract (docs/design.md, deploy/metrics.yaml, the dashboards and the
alert rules query them):

* ``guard_requests_total{verdict}``: one per answered instance with its verdict (``pass``,
  ``repaired``, ``rejected``, ``flagged``), and one ``error`` per request that failed validation
  (or an instance the guard itself could not check);
* ``guard_rejections_total{reason}``: one per rejected *or flagged* instance, under its main reason
  (the check furthest over its threshold), so the sum is the number refused and shadow mode shows
  what enforce mode would refuse;
* ``guard_latency_seconds``: histogram of the guard's own work per batch, in seconds (TorchServe's
  buckets are fixed on the seconds scale).

Label values are sanitised (:func:`label_value`): TorchServe serialises dimensions as
``name:value,name:value`` in its metric log lines, so a ``,`` or ``:`` in a value would corrupt them.

The sink that reports through TorchServe is :class:`guard.torchserve.metrics.TorchServeSink`; nothing
here knows TorchServe.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

REQUESTS = "guard_requests_total"
REJECTIONS = "guard_rejections_total"
LATENCY = "guard_latency_seconds"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_MAX_LABEL = 64


def label_value(value: Any) -> str:
    """A metric label value with only ``[A-Za-z0-9_.-]`` (others become ``_``), at most 64 chars.

    Never contains ``,`` or ``:`` (TorchServe's dimension separators) nor ``|`` or ``#`` (its
    field separators); an empty value becomes ``unknown``.
    """
    text = _UNSAFE.sub("_", str(value))[:_MAX_LABEL]
    return text or "unknown"


@runtime_checkable
class MetricsSink(Protocol):
    """What the handler (and the CLI) report to; implementations must never raise on a bad label."""

    def requests(self, verdict: str, count: int = 1) -> None:
        """Count ``count`` instances (or failed requests) under ``verdict``."""

    def rejections(self, reason: str, count: int = 1) -> None:
        """Count ``count`` rejected or flagged instances under one ``reason`` (a check name)."""

    def latency(self, seconds: float) -> None:
        """Observe the guard's own time for one batch, in seconds."""


def count_decisions(sink: MetricsSink, decisions: Iterable[Any]) -> None:
    """Count each decision's verdict, and each rejected or flagged one once under its main reason.

    ``decisions`` are :class:`guard.online.Decision` (or anything with ``verdict`` and ``reasons``);
    the guard lists reasons strongest first (largest relative margin over the threshold), so the
    first is the main one. One count per input keeps ``sum(guard_rejections_total)`` equal to the
    inputs rejected or flagged, which is what operators divide by; every fired check is still in the
    response and the audit log. A decision without a reason counts under ``unknown``.
    """
    for d in decisions:
        sink.requests(d.verdict)
        if d.verdict in ("rejected", "flagged"):
            sink.rejections(d.reasons[0] if d.reasons else "unknown")


class InMemorySink:
    """Counts in plain dicts: for tests, ``guard check``-style replays and the demo's summary."""

    def __init__(self) -> None:
        self.requests_total: Counter[str] = Counter()
        self.rejections_total: Counter[str] = Counter()
        self.latencies: list[float] = []

    def requests(self, verdict: str, count: int = 1) -> None:
        self.requests_total[label_value(verdict)] += count

    def rejections(self, reason: str, count: int = 1) -> None:
        self.rejections_total[label_value(reason)] += count

    def latency(self, seconds: float) -> None:
        self.latencies.append(float(seconds))

    def render(self) -> str:
        """Prometheus-style text lines (no HELP/TYPE) of the counters, sorted, for printing."""
        lines = [f'{REQUESTS}{{verdict="{k}"}} {v}' for k, v in sorted(self.requests_total.items())]
        lines += [f'{REJECTIONS}{{reason="{k}"}} {v}' for k, v in sorted(self.rejections_total.items())]
        if self.latencies:
            lines.append(f"{LATENCY}_count {len(self.latencies)}")
            lines.append(f"{LATENCY}_sum {sum(self.latencies):.6f}")
        return "\n".join(lines)


__all__ = ["LATENCY", "REJECTIONS", "REQUESTS", "InMemorySink", "MetricsSink", "label_value",
           "count_decisions"]
