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

Served models report through a :class:`BatchedSink`: every metric update a TorchServe worker makes is a
log line that its frontend reads and parses, and one line per counter per request costs about a tenth of
the CPU a request takes (docs/benchmarks.md, 'Serving cost'). The counters are summed in the
worker and reported at most once per interval (at once for a batch with anything but ``pass`` in it), and
the latency histogram observes at most :data:`LATENCY_SAMPLES` batches per interval.

Label values are sanitised (:func:`label_value`): TorchServe serialises dimensions as
``name:value,name:value`` in its metric log lines, so a ``,`` or ``:`` in a value would corrupt them.

The sink that reports through TorchServe is :class:`guard.torchserve.metrics.TorchServeSink`; nothing
here knows TorchServe.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
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

    def flush(self, *, force: bool = False) -> None:
        """Report what is buffered when it is due, or now with ``force`` (nothing to do for a sink that reports
        every call as it comes). The service calls it after each batch, and with ``force`` when it closes."""


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


class NullSink:
    """Counts nothing: the sink of a service that was given none (and the worker's side of reporting, timed
    without TorchServe)."""

    def requests(self, verdict: str, count: int = 1) -> None:
        pass

    def rejections(self, reason: str, count: int = 1) -> None:
        pass

    def latency(self, seconds: float) -> None:
        pass

    def flush(self, *, force: bool = False) -> None:
        pass


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

    def flush(self, *, force: bool = False) -> None:
        pass

    def render(self) -> str:
        """Prometheus-style text lines (no HELP/TYPE) of the counters, sorted, for printing."""
        lines = [f'{REQUESTS}{{verdict="{k}"}} {v}' for k, v in sorted(self.requests_total.items())]
        lines += [f'{REJECTIONS}{{reason="{k}"}} {v}' for k, v in sorted(self.rejections_total.items())]
        if self.latencies:
            lines.append(f"{LATENCY}_count {len(self.latencies)}")
            lines.append(f"{LATENCY}_sum {sum(self.latencies):.6f}")
        return "\n".join(lines)


DEFAULT_FLUSH_SECONDS = 1.0
"""How long a served model's pass counts may wait in the worker before they are reported."""
MAX_FLUSH_SECONDS = 3600.0
"""The longest flush interval an archive may ask for."""


def flush_seconds(value: Any) -> float:
    """``metrics_flush_seconds`` as a number of seconds in ``[0, MAX_FLUSH_SECONDS]``; ValueError otherwise (the
    archive command, the archive's config and the CLI each turn it into their own error)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metrics_flush_seconds must be a number, got {value!r}") from None
    if not 0 <= seconds <= MAX_FLUSH_SECONDS:
        raise ValueError(f"metrics_flush_seconds must be between 0 and {MAX_FLUSH_SECONDS:g} seconds, got {value}")
    return seconds


LATENCY_SAMPLES = 10
"""Latency observations per flush interval at most (the first batch after each tenth of it)."""


class BatchedSink:
    """Sums counters in memory and reports them to ``sink`` in one update per label, off the per-request path.

    :meth:`flush` (the service calls it after each batch) reports the sums when ``interval`` seconds have passed
    since the last report, or at once when anything but a ``pass`` was counted since: a rejection, a flag, a
    repair or an error reaches the metrics port with the batch that caused it, so alerts are not delayed. Only
    ``pass`` counts wait, at most ``interval`` seconds plus the gap to the next batch; a worker that dies loses
    the pass counts of its last interval (rejections are never pending: they were reported with their batch,
    and every one also has its audit-trail line). The latency histogram observes the first batch after each
    ``interval / LATENCY_SAMPLES`` seconds (a sample independent of the latency itself; its ``_count`` is the
    number of observed batches, not of all batches). ``interval=0`` reports every call as it comes.
    """

    def __init__(self, sink: MetricsSink, *, interval: float = DEFAULT_FLUSH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval!r}")
        self.sink = sink
        self.interval = float(interval)
        self._clock = clock
        self._requests: Counter[str] = Counter()
        self._rejections: Counter[str] = Counter()
        self._urgent = False
        self._last_flush = self._last_latency = -float("inf")

    def requests(self, verdict: str, count: int = 1) -> None:
        self._requests[verdict] += count
        self._urgent = self._urgent or verdict != "pass"

    def rejections(self, reason: str, count: int = 1) -> None:
        self._rejections[reason] += count
        self._urgent = True

    def latency(self, seconds: float) -> None:
        now = self._clock()
        if now - self._last_latency >= self.interval / LATENCY_SAMPLES:
            self._last_latency = now
            self.sink.latency(seconds)

    @property
    def pending(self) -> int:
        """Counts summed and not reported yet."""
        return sum(self._requests.values()) + sum(self._rejections.values())

    def flush(self, *, force: bool = False) -> None:
        """Report the sums if due (see the class); ``force`` reports them now."""
        now = self._clock()
        if not (force or self._urgent or now - self._last_flush >= self.interval):
            return
        self._last_flush, self._urgent = now, False
        requests, rejections = self._requests, self._rejections
        self._requests, self._rejections = Counter(), Counter()
        for verdict, n in requests.items():
            self.sink.requests(verdict, n)
        for reason, n in rejections.items():
            self.sink.rejections(reason, n)
        self.sink.flush(force=True)


__all__ = ["DEFAULT_FLUSH_SECONDS", "LATENCY", "LATENCY_SAMPLES", "MAX_FLUSH_SECONDS", "REJECTIONS", "REQUESTS",
           "BatchedSink", "InMemorySink", "NullSink", "MetricsSink", "label_value", "count_decisions", "flush_seconds"]
