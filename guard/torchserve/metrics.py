"""Guard's counters through TorchServe's per-worker metrics cache (a :class:`~guard.serving.metrics.MetricsSink`)."""

from __future__ import annotations

import logging
from typing import Any

from guard.serving.metrics import LATENCY, REJECTIONS, REQUESTS, label_value

logger = logging.getLogger(__name__)


class TorchServeSink:
    """Reports through TorchServe's per-worker metrics cache (``context.metrics``).

    ``metrics`` is ``context.metrics`` (a ``ts.metrics`` cache: ``add_counter``, ``add_metric``),
    ``dimension`` is ``ts.metrics.dimension.Dimension`` and ``histogram`` is
    ``ts.metrics.metric_type_enum.MetricTypes.HISTOGRAM`` (:meth:`for_context` fills them in). Calls must
    happen while a request batch is being handled: only then does TorchServe append ``ModelName`` and
    ``Level=Model``, which the declarations in deploy/metrics.yaml expect after guard's own label.
    Failures to report are swallowed (reported once through ``on_error``) so metrics never fail a
    prediction.
    """

    def __init__(self, metrics: Any, dimension: type, histogram: Any, *, on_error=None):
        self._m = metrics
        self._dim = dimension
        self._hist = histogram
        self._on_error = on_error
        self._warned = False

    @classmethod
    def for_context(cls, context: Any) -> TorchServeSink:
        """The sink of a TorchServe worker's context; a failed report is logged once as a warning."""
        from ts.metrics.dimension import Dimension
        from ts.metrics.metric_type_enum import MetricTypes

        return cls(context.metrics, Dimension, MetricTypes.HISTOGRAM,
                   on_error=lambda e: logger.warning("guard: metric not recorded: %s", e))

    def _safe(self, method: str, *args) -> None:
        try:
            getattr(self._m, method)(*args)
        except Exception as e:  # a metrics failure must never turn into a failed prediction
            if self._on_error is not None and not self._warned:
                self._warned = True
                self._on_error(e)

    def requests(self, verdict: str, count: int = 1) -> None:
        self._safe("add_counter", REQUESTS, count, None, [self._dim("verdict", label_value(verdict))])

    def rejections(self, reason: str, count: int = 1) -> None:
        self._safe("add_counter", REJECTIONS, count, None, [self._dim("reason", label_value(reason))])

    def latency(self, seconds: float) -> None:
        self._safe("add_metric", LATENCY, float(seconds), "s", None, [], self._hist)

    def flush(self, *, force: bool = False) -> None:
        """Every call above is reported as it comes (each becomes one metric log line of the worker)."""


__all__ = ["TorchServeSink"]
