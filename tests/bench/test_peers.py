"""The benchmark's input-level peers (IBD-PSC, SCALE-UP, STRIP) on the session's backdoored fixtures.

Floors are measured on the fixtures (BadNets DemoNet without BatchNorm; BadNets GapNet with it),
on 150 clean and 150 triggered held-out images, with a margin below the measured figure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.peers import IBDPSC, PeerUnavailable, ScaleUp, Strip
from guard.bench.peers.evaluate import best_peer, peer_rows
from guard.stats import roc_auc

N = 150


@pytest.fixture(scope="module")
def demo(demo_world):
    from guard import load_model
    from guard.data import load_npz

    model = load_model(demo_world.model_file, demo_world.weights)
    xc, yc = load_npz(demo_world.clean)
    xh, yh = load_npz(demo_world.holdout)
    atk = demo_world.attack
    return model, xc[:300], yc[:300], xh[:N], atk.stamp(xh[atk.victims(yh)][:N])


@pytest.fixture(scope="module")
def gap(gap_world):
    w = gap_world
    pos = w.attack.stamp(w.x_test[w.attack.victims(w.y_test)][:N])
    return w.model, w.x_train[:300], w.y_train[:300], w.x_test[:N], pos


def _auroc(est, neg, pos) -> float:
    return roc_auc(est.score(neg), est.score(pos))


def test_scale_up_separates_badnets_on_demonet(demo):
    model, xc, _, neg, pos = demo
    free = ScaleUp().fit(model, xc)
    limited = ScaleUp(variant="data_limited").fit(model, xc)
    assert free.forwards_per_input == 6
    assert _auroc(free, neg, pos) >= 0.85  # measured 0.91 (300 + 300 images)
    assert _auroc(limited, neg, pos) >= 0.95  # measured 0.98: the per-class standardisation helps


def test_strip_peer_separates_badnets_on_demonet(demo):
    model, xc, _, neg, pos = demo
    st = Strip(n=10, seed=0).fit(model, xc[:200], xc[200:])
    assert _auroc(st, neg, pos) >= 0.9


def test_ibd_psc_separates_badnets_on_a_batchnorm_net(gap):
    model, xc, yc, neg, pos = gap
    est = IBDPSC().fit(model, xc, yc)
    assert est.forwards_per_input == 6 and len(est.copies_) == 5 and len(est.layers_) == 3
    # three BatchNorm layers: the clean error passes 0.6 only past all of them, so the copies amplify all
    # three by growing factors, and every copy has lost the model's clean accuracy
    assert [k for k, _ in est.rungs_] == [3] * 5 and np.all(np.diff([f for _, f in est.rungs_]) > 0)
    from guard.bench.peers._common import probabilities

    truth = probabilities(model, neg).argmax(1)
    assert all((probabilities(m, neg).argmax(1) != truth).mean() > 0.5 for m in est.copies_)
    assert _auroc(est, neg, pos) >= 0.75  # measured 0.81 (200 + 200 images): clean inputs tie at 1.0


def test_ibd_psc_refuses_a_model_without_batchnorm_and_the_bench_says_why(demo):
    model, xc, yc, neg, pos = demo
    with pytest.raises(PeerUnavailable, match="BatchNorm"):
        IBDPSC().fit(model, xc, yc)
    rows = peer_rows(model, xc[:60], yc[:60], neg[:20], pos[:20])
    assert rows["ibd_psc"]["available"] is False and "BatchNorm" in rows["ibd_psc"]["reason"]
    assert "auroc" not in rows["ibd_psc"]  # no silent zero
    assert rows["scale_up"]["available"] and 0 <= rows["scale_up"]["auroc"] <= 1
    assert best_peer(rows)[0] in ("scale_up", "scale_up.data_limited")


def test_peers_leave_weights_and_mode_unchanged_and_are_deterministic(gap):
    model, xc, yc, neg, pos = gap
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # a training-mode model must come back in training mode, its BatchNorm statistics untouched
    try:
        ibd = IBDPSC(max_fit=100).fit(model, xc, yc)
        a = ibd.score(pos[:30])
        su = ScaleUp(max_fit=100).fit(model, xc)
        s = su.score_variants(pos[:30])
        assert model.training
    finally:
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(a, IBDPSC(max_fit=100).fit(model, xc, yc).score(pos[:30]))
    again = ScaleUp(max_fit=100).fit(model, xc).score_variants(pos[:30])
    for k in s:
        np.testing.assert_array_equal(s[k], again[k])
