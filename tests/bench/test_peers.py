"""The benchmark's input-level peers (IBD-PSC, SCALE-UP, STRIP, TED, TED++) on the session's backdoored fixtures.

Floors are measured on the fixtures (BadNets DemoNet without BatchNorm; BadNets GapNet with it),
on 150 clean and 150 triggered held-out images, with a margin below the measured figure.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.peers import IBDPSC, TED, PeerUnavailable, ScaleUp, Strip, TEDPlusPlus
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
    for key in ("ted", "ted_pp"):
        assert rows[key]["available"] and 0 <= rows[key]["auroc"] <= 1 and 0 <= rows[key]["tpr_at_1pct_fpr"] <= 1
        assert rows[key]["forwards_per_input"] == 1 and rows[key]["layers"] == 8
        assert rows[key]["seconds_per_input_ms"] > 0 and 0 < rows[key]["references"] <= 60
    assert best_peer(rows)[0] in ("scale_up", "scale_up.data_limited", "ted", "ted_pp")


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


DEMO_LAYERS = ["features.0", "features.1", "features.3", "features.4", "features.6", "features.7", "fc", "head"]


@pytest.mark.parametrize("cls", [TED, TEDPlusPlus])
def test_ted_separates_badnets_on_demonet(demo, cls):
    model, xc, yc, neg, pos = demo
    est = cls().fit(model, xc, yc)
    assert est.forwards_per_input == 1 and est.layers_ == DEMO_LAYERS  # convolutions, ReLUs, Linears
    assert 280 <= len(est.ref_labels_) <= 300  # the correctly classified clean images
    assert _auroc(est, neg, pos) >= 0.93  # measured 0.991 (TED), 0.994 (TED++) on 150 + 150 images
    # the dynamics the score reads: a triggered input is far from the target class in the middle of the
    # network and among it at the logits, where a clean input is among its own class late throughout
    tn, tp = est.trajectory(neg), est.trajectory(pos)
    assert tp[:, 5].mean() > 5 * tn[:, 5].mean() + 10  # features.7: measured 71 against 0.1 (TED)
    if cls is TED:  # at the logits the triggered input has joined the target class (TED++'s tube may still see it)
        assert np.median(tn[:, -1]) == 0 and np.median(tp[:, -1]) == 0


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ted_leaves_weights_mode_and_hooks_unchanged_and_is_deterministic_and_batch_independent(gap):
    model, xc, yc, neg, pos = gap
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # a training-mode model comes back in training mode, its BatchNorm statistics untouched
    try:
        scores = {}
        for cls in (TED, TEDPlusPlus):
            est = cls(max_fit=120).fit(model, xc, yc)
            scores[cls] = est.score(pos[:40])
            assert model.training and _hooks(model) == 0
            again = cls(max_fit=120).fit(model, xc, yc).score(pos[:40])
            np.testing.assert_array_equal(scores[cls], again)
            small = cls(max_fit=120, batch_size=7).fit(model, xc, yc).score(pos[:40])
            np.testing.assert_allclose(small, scores[cls], rtol=1e-6)
            assert _auroc(est, neg[:40], pos[:40]) >= 0.95  # measured 0.999 / 1.000 on 150 + 150
    finally:
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class _FailsOnLargeBatches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.conv(x)).mean((2, 3))
        if len(x) > 3:
            raise ValueError("too large")
        return self.fc(h)


def test_ted_removes_its_hooks_when_the_model_fails_and_refuses_a_model_without_layers():
    net = _FailsOnLargeBatches()
    x = np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="too large"):
        TED(batch_size=5).fit(net, x)
    assert _hooks(net) == 0 and net.training

    class Bare(torch.nn.Module):  # no submodules: nothing to follow
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3 * 8 * 8, 4))

        def forward(self, x):
            return x.flatten(1) @ self.w

    with pytest.raises(PeerUnavailable, match="at least two layers"):  # the guard's check raises ModelError
        TEDPlusPlus().fit(Bare(), x)


@pytest.mark.parametrize("net, n_layers", [("resnet", 35), ("vit", 14)])
def test_ted_follows_a_resnet_and_a_vit(net, n_layers):
    """Every call of a module is a layer (a ResNet block applies its ReLU twice); a ViT's token outputs
    (its MLPs' Linears and GELUs) are averaged over tokens. Untrained nets: this checks the tracing."""
    from guard.demo.nets.resnet import ResNet18
    from guard.demo.nets.vit import TinyViT

    torch.manual_seed(0)
    model = (ResNet18 if net == "resnet" else TinyViT)().eval()
    x = np.random.default_rng(0).random((40, 3, 32, 32), dtype=np.float32)
    est = TEDPlusPlus().fit(model, x[:30])
    assert len(est.layers_) == n_layers and len(set(est.layers_)) == n_layers
    if net == "resnet":
        assert est.layers_[:6] == ["conv1", "relu", "layer1.0.conv1", "layer1.0.relu", "layer1.0.conv2",
                                   "layer1.0.relu#2"]
        assert est.ref_[0].shape == (30, 16 * 16)  # 16 channels on a 4x4 grid
    else:
        assert est.layers_[1:4] == ["blocks.0.mlp.0", "blocks.0.mlp.1", "blocks.0.mlp.2"] and est.layers_[-1] == "head"
        assert est.ref_[1].shape == (30, 128)  # tokens averaged
    s = est.score(x[30:])
    assert s.shape == (10,) and np.isfinite(s).all() and _hooks(model) == 0
