"""Neural Cleanse: flags the demo target, stays quiet on a clean model, follows the published rule."""

import json

import numpy as np
import pytest

from guard import NeuralCleanse, load_model
from guard.data import load_npz, split
from guard.demo.world import DEMO_TARGET
from guard.stats import anomaly_index, family_threshold, log_anomaly_index


def test_flags_the_demo_target(demo_profile):
    meta = json.loads((demo_profile / "profile.json").read_text())
    assert meta["suspect_labels"] == [DEMO_TARGET]
    per_label = {r["label"]: r for r in meta["scan"]["per_label"]}
    target = per_label[DEMO_TARGET]
    others = [r["l1_norm"] for lab, r in per_label.items() if lab != DEMO_TARGET]
    # the reversed trigger is about the size of the real 3x3 patch (at most twice its 9 pixels: its
    # soft edges), far below every natural label
    assert target["l1_norm"] <= 18
    assert target["l1_norm"] < 0.75 * min(others)
    assert max(target["anomaly_index"], target["log_anomaly_index"]) > 2


def test_does_not_flag_a_clean_model(clean_scan):
    nc = clean_scan.nc  # the default scan's fit (seed 0, default budget) on half the clean world's images
    assert nc.suspect_labels_ == []
    assert nc.converged_.all()
    assert (nc.attack_success_ >= 0.99).all()


def test_flag_rule_is_below_median_and_index_over_two():
    nc = NeuralCleanse(threshold=2.0)
    nc.labels_ = list(range(6))
    nc.l1_norms_ = np.array([5.0, 60, 64, 70, 75, 300])  # label 5 is anomalous but *above* the median
    nc.anomaly_index_ = anomaly_index(nc.l1_norms_)
    nc.log_anomaly_index_ = log_anomaly_index(nc.l1_norms_)
    nc.converged_ = np.ones(6, bool)
    nc.threshold_ = nc.threshold
    assert nc._flag() == [0]


def test_the_bar_grows_with_the_labels_a_minimum_is_taken_over():
    assert family_threshold(2.0, 10) == 2.0 and family_threshold(2.0, 4) == 2.0
    assert family_threshold(2.0, 100) == pytest.approx(2.837, abs=1e-3)
    assert family_threshold(2.0, 1000) == pytest.approx(3.506, abs=1e-3)
    assert family_threshold(2.0, 50) < family_threshold(2.0, 100) < family_threshold(2.0, 1000)


def test_screened_candidates_are_held_to_the_raised_bar():
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 40)).eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    nc = NeuralCleanse(max_rounds=2, seed=0, progress=False, screen_above=0, candidates=3, references=5,
                       screen_steps=4).fit(net, x)
    s = nc.screened_
    assert len(s["candidates"]) == 3 and len(s["references"]) == 5 and len(nc.labels_) == 8
    assert nc.threshold_ == pytest.approx(family_threshold(2.0, 40))
    np.testing.assert_allclose(nc.anomaly_index_, anomaly_index(nc.l1_norms_))
    unscreened = NeuralCleanse(max_rounds=2, seed=0, progress=False, screen_above=None).fit(net, x)
    assert unscreened.screened_ is None and len(unscreened.labels_) == 40 and unscreened.threshold_ == 2.0


def _screened_flags(l1: list[float], labels: list[int], k_all: int) -> list[int]:
    nc = NeuralCleanse()
    nc.labels_, nc.l1_norms_ = labels, np.array(l1)
    nc.anomaly_index_, nc.log_anomaly_index_ = anomaly_index(nc.l1_norms_), log_anomaly_index(nc.l1_norms_)
    nc.converged_ = np.ones(len(l1), bool)
    nc.threshold_ = family_threshold(nc.threshold, k_all)  # the bar a scan screened from k_all labels holds
    return nc._flag()


def test_a_screened_scan_flags_a_label_only_where_it_stands_apart():
    """The full stage's L1 norms of a 100-class composed-glyph world and of its clean twin (seed 5): the
    twin's cheapest natural label passes the raised MAD bar (index 3.9 > 2.84) but costs 0.77 of the next
    natural label's, so the isolation bar holds it; the backdoored model's target costs 0.23 of it."""
    twin = [61.1, 61.1, 33.5, 64.7, 51.8, 61.9, 44.2, 45.8, 43.6, 60.3, 69.1, 51.4, 57.6, 56.1, 56.5]
    labels = [1, 5, 11, 27, 43, 47, 51, 59, 61, 68, 74, 75, 95, 96, 97]
    assert max(anomaly_index(np.array(twin))) > family_threshold(2.0, 100)
    assert _screened_flags(twin, labels, 100) == []
    backdoored = [53.1, 46.5, 9.1, 49.2, 56.0, 46.9, 52.1, 51.3, 60.9, 51.7, 53.5, 40.1, 41.9, 47.5, 57.7]
    assert _screened_flags(backdoored, [1, 5, 6, 11, 28, 35, 45, 49, 60, 73, 74, 85, 88, 96, 97], 100) == [6]


def test_every_screening_chunk_sees_the_same_images_at_each_step(monkeypatch):
    """Scores compare across chunks only if every chunk's labels are stamped on the same images: a batch per
    chunk let one chunk's easy images put its labels first."""
    import torch

    import guard.scan.neural_cleanse as ncm

    seen: list[torch.Tensor] = []
    real = ncm.stamp_all
    monkeypatch.setattr(ncm, "stamp_all", lambda x, m, p: seen.append(x.clone()) or real(x, m, p))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 40)).eval()
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    NeuralCleanse(seed=0, progress=False, screen_above=0, candidates=3, references=5, screen_steps=6,
                  screen_chunk=16, max_rounds=1).fit(net, x)
    assert len(seen) > 3 * 6  # the screening's three chunks of at most 16 labels, six steps each, come first
    for step in range(6):
        assert torch.equal(seen[step], seen[6 + step]) and torch.equal(seen[step], seen[12 + step])
    assert not torch.equal(seen[0], seen[1])  # the steps themselves draw new images


def test_anomaly_index_uses_the_consistency_constant():
    v = np.array([1.0, 2, 3, 4, 100])
    med, mad = 3.0, np.median(np.abs(v - 3.0))
    assert anomaly_index(v)[0] == pytest.approx((med - 1) / (1.4826 * mad))


def test_masks_and_patterns_live_in_pixel_space(demo_world):
    model = load_model(demo_world.model_file, demo_world.weights)
    x, _ = load_npz(demo_world.clean)
    nc = NeuralCleanse(seed=0, max_rounds=6, progress=False).fit(model, x[:64])
    assert nc.masks_.shape == (10, 1, 32, 32) and nc.patterns_.shape == (10, 3, 32, 32)
    for a in (nc.masks_, nc.patterns_):
        assert a.min() >= 0 and a.max() <= 1


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_flags_the_demo_target_and_returns_the_model_to_the_cpu(demo_world):
    model = load_model(demo_world.model_file, demo_world.weights)
    x, y = load_npz(demo_world.clean)
    xf, _, _, _ = split(x, y, 0.5, seed=0)
    nc = NeuralCleanse(seed=0, progress=False, device="cuda").fit(model, xf)
    assert nc.suspect_labels_ == [DEMO_TARGET]
    assert nc.l1_norms_[DEMO_TARGET] <= 18 and nc.masks_.shape == (10, 1, 32, 32)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_device_cpu_is_the_default_and_changes_nothing(demo_world):
    model = load_model(demo_world.model_file, demo_world.weights)
    x, _ = load_npz(demo_world.clean)
    a = NeuralCleanse(seed=0, max_rounds=3, progress=False).fit(model, x[:64])
    b = NeuralCleanse(seed=0, max_rounds=3, progress=False, device="cpu").fit(model, x[:64])
    np.testing.assert_array_equal(a.masks_, b.masks_)
    assert a.device == "cpu"


def test_two_stage_scan_flags_the_target_of_a_100_class_model(tmp_path):
    """Above 25 labels every label is screened first; on the composed-glyph 100-class world the
    BadNets target is among the candidates and flagged over the bar raised for 100 labels."""
    from guard.bench.nc_speed import scaling_world

    w = scaling_world(tmp_path / "composed-100", 100, backdoored=True)
    assert w.clean_accuracy >= 0.95 and w.attack_success >= 0.95, (w.clean_accuracy, w.attack_success)
    x, y = load_npz(w.clean)
    xf, _, _, _ = split(x, y, 0.5, seed=0)
    nc = NeuralCleanse(seed=0, progress=False, max_rounds=40).fit(load_model(w.model_file, w.weights), xf)
    assert DEMO_TARGET in nc.screened_["candidates"], nc.screened_
    assert nc.suspect_labels_ == [DEMO_TARGET], (nc.suspect_labels_, nc.threshold_)
