"""guard.serving.metrics without TorchServe: what each decision adds to the counters, and the reasons' order."""

from __future__ import annotations

import numpy as np

from guard.online.engine import GuardResult
from guard.online.ensemble import UnionRule
from guard.online.policy import Decision
from guard.serving.metrics import InMemorySink, count_decisions


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
                      np.array([1, 1, 0]), {}, 0.0, 0.0, strength.max(1), 0.0, strength)
    first, second, third = res.decisions
    assert first.reasons == ["knn", "feature"]  # knn 3x its threshold beats feature's 1.2x
    assert second.reasons == ["neuron", "feature"]
    assert third.reasons == [] and third.verdict == "pass"
    assert first.scores["ensemble"] == round(float(strength[0].max()), 4)
