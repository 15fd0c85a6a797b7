"""guard.serving.metrics without TorchServe: what each decision adds to the counters, and the reasons' order."""

from __future__ import annotations

import numpy as np
import pytest

from guard.online.engine import GuardResult
from guard.online.ensemble import UnionRule
from guard.online.policy import Decision
from guard.serving.metrics import BatchedSink, InMemorySink, count_decisions


def test_each_refused_input_counts_once_under_its_main_reason():
    sink = InMemorySink()
    count_decisions(sink, [Decision(1, [1.0], "pass"), Decision(None, None, "rejected", ["knn", "feature"]),
                            Decision(None, None, "rejected", ["feature"]), Decision(3, [1.0], "flagged", []),
                            Decision(2, [1.0], "repaired", ["neuron"])])
    assert sink.requests_total == {"pass": 1, "rejected": 2, "flagged": 1, "repaired": 1}
    # the sum is the number refused (rejected or flagged), whatever the number of fired checks
    assert sink.rejections_total == {"knn": 1, "feature": 1, "unknown": 1}


def test_reasons_are_ordered_by_their_strength():
    names = ["feature", "knn", "neuron"]
    scores = np.array([[120.0, 0.9, 2.0], [101.0, 0.1, 9.0], [1.0, 0.1, 1.0]], np.float32)
    thresholds = np.array([100.0, 0.3, 3.0])
    over = scores > thresholds
    strength = UnionRule(thresholds).fit().contributions(scores)  # margin over the threshold, relative to it
    res = GuardResult(names, np.zeros((3, 4), np.float32), scores, thresholds, over,
                      np.array([1, 1, 0]), {}, strength.max(1), 0.0, strength)
    first, second, third = res.decisions
    assert first.reasons == ["knn", "feature"]  # knn 3x its threshold beats feature's 1.2x
    assert second.reasons == ["neuron", "feature"]
    assert third.reasons == [] and third.verdict == "pass"
    assert first.scores["ensemble"] == round(float(strength[0].max()), 4)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_batched_sink_holds_pass_counts_for_its_interval_and_reports_them_summed():
    inner, clock = InMemorySink(), _Clock()
    sink = BatchedSink(inner, interval=1.0, clock=clock)
    sink.flush()  # nothing counted yet: an empty report
    for _ in range(5):
        sink.requests("pass")
        clock.t += 0.1
        sink.flush()
    assert inner.requests_total == {} and sink.pending == 5  # 0.5 s since the last report: waiting
    clock.t += 0.6
    sink.requests("pass")
    sink.flush()
    assert inner.requests_total == {"pass": 6} and sink.pending == 0


def test_batched_sink_reports_anything_but_a_pass_with_its_batch():
    inner, clock = InMemorySink(), _Clock()
    sink = BatchedSink(inner, interval=60.0, clock=clock)
    sink.flush()
    sink.requests("pass", 3)
    sink.flush()
    assert inner.requests_total == {}
    sink.requests("rejected")
    sink.rejections("knn")
    sink.flush()  # a rejection goes out at once, and the pending passes with it
    assert inner.requests_total == {"pass": 3, "rejected": 1} and inner.rejections_total == {"knn": 1}
    sink.requests("error")
    sink.flush()
    assert inner.requests_total == {"pass": 3, "rejected": 1, "error": 1}
    sink.requests("pass")
    sink.flush(force=True)  # closing: everything pending
    assert inner.requests_total["pass"] == 4 and sink.pending == 0


def test_batched_sink_samples_latency_at_most_ten_times_per_interval():
    inner, clock = InMemorySink(), _Clock()
    sink = BatchedSink(inner, interval=1.0, clock=clock)
    for _ in range(200):  # 2 s of batches every 10 ms
        sink.latency(0.002)
        clock.t += 0.01
    assert len(inner.latencies) == 20 and inner.latencies[0] == 0.002


def test_batched_sink_with_no_interval_reports_every_call():
    inner = InMemorySink()
    sink = BatchedSink(inner, interval=0)
    for verdict in ("pass", "pass", "rejected"):
        sink.requests(verdict)
        sink.latency(0.001)
        sink.flush()
        assert sink.pending == 0
    assert inner.requests_total == {"pass": 2, "rejected": 1} and len(inner.latencies) == 3
    with pytest.raises(ValueError, match="interval"):
        BatchedSink(inner, interval=-1)
