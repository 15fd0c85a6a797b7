"""The unlearning schedule: which suspect labels' triggers a tuning stamps, epoch by epoch."""

import numpy as np
import pytest
import torch

from guard.purify import Evidence
from guard.purify.base import Candidates
from guard.purify.triggers import Trigger


def _mask(pixels: int) -> np.ndarray:
    m = np.zeros((1, 8, 8), np.float32)
    m.reshape(-1)[:pixels] = 1.0
    return m


def _candidates(costs: dict[int, int]) -> Candidates:
    labels = sorted(costs)
    ev = Evidence(labels, np.stack([_mask(costs[s]) for s in labels]), np.zeros((len(labels), 3, 8, 8), np.float32))
    x = np.zeros((4, 3, 8, 8), np.float32)
    return Candidates(x, np.zeros(4, np.int64), ev, selection=None, original=None, num_classes=10)


def _fake_rereversal(c: Candidates, rounds: list[dict[int, float]]):
    """Stand in for Neural Cleanse: round r re-reverses each label at the given L1."""
    def rereverse(model, round_, **kw):
        l1 = rounds[round_ - 1]
        return [(s, Trigger.of(_mask(int(l1[s])), np.zeros((3, 8, 8), np.float32))) for s in c.evidence.labels]
    c.rereverse = rereverse


def _costs(triggers) -> list[float]:
    return sorted({float(t.mask.sum()) for t in triggers})


def test_the_cheapest_evidence_is_unlearned_first_and_the_next_label_joins_when_it_is_as_cheap():
    c = _candidates({5: 20, 6: 6})
    _fake_rereversal(c, [{5: 19.0, 6: 14.0}, {5: 18.0, 6: 50.0}])
    first, refresh = c.unlearning(every=2, lead=1.5)
    assert len(first) == 2 and all(float(t.mask.sum()) == 6 for t in first)  # label 6 where found and anywhere
    assert c.details["unlearned_labels"] == [6]
    assert refresh(None) == first  # epoch 1: no re-reversal yet
    second = refresh(None)  # epoch 2: label 6 re-reversed at 14, label 5 at 19 (within 1.5 x 14)
    assert c.details["unlearned_labels"] == [5, 6]
    assert _costs(second) == [6.0, 14.0, 19.0, 20.0]
    refresh(None)
    fourth = refresh(None)  # label 6 at 50 now: it stays in, the cheapest is label 5
    assert c.details["unlearned_labels"] == [5, 6] and 50.0 in _costs(fourth)


def test_without_lead_every_suspect_label_is_unlearned_from_the_start():
    c = _candidates({5: 20, 6: 6})
    first, refresh = c.unlearning(every=0, lead=None)
    assert refresh is None and _costs(first) == [6.0, 20.0] and len(first) == 4
    one = _candidates({6: 6})
    first, _ = one.unlearning(every=0, lead=1.5)
    assert len(first) == 2


@pytest.mark.parametrize("costs", [{3: 8, 6: 10}, {3: 10, 6: 8}])
def test_two_targets_of_similar_cost_join_together(costs):
    c = _candidates(costs)
    first, _ = c.unlearning(every=0, lead=1.5)
    assert c.details["unlearned_labels"] == [3, 6] and len(first) == 4
    assert torch.is_tensor(first[0].mask)
