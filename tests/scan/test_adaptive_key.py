"""The scan's own adaptive attacker: its key reaches the label while the layers' mismatch falls, it leaves the
model as it was, bad settings are refused, and ``guard scan`` weights the checks with it where it suspects a
label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guard.scan.adaptive_key import AdaptiveKey, adaptive_stamped


@pytest.fixture(scope="module")
def demo(demo_world):
    from guard import load_model
    from guard.data import load_npz

    model = load_model(demo_world.model_file, demo_world.weights)
    x, y = load_npz(demo_world.clean)
    return model, x, y, demo_world.attack.target


def test_the_key_reaches_the_backdoors_label_and_matches_the_layers(demo):
    """On the demo's BadNets model a full-image key at opacity 0.15 finds the backdoor's label from noise
    (measured: 1.00 at 100 steps) while its layers' mismatch with the clean label's falls; the model keeps
    its weights, mode and gradient flags, and the hooks are gone."""
    model, x, y, target = demo
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = AdaptiveKey(steps=100).fit(model, x, y, target)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    assert key.key_.shape == x.shape[1:] and 0 <= key.key_.min() and key.key_.max() <= 1
    assert key.label_ == target and key.success_ >= 0.5 and key.layers_ >= 5
    assert key.matching_loss_[1] < key.matching_loss_[0]
    np.testing.assert_allclose(key.stamp(x[:3]), 0.85 * x[:3] + 0.15 * key.key_, atol=1e-6)


def test_stamped_images_are_the_ones_that_reach_their_label(demo):
    model, x, y, target = demo
    xs, keys = adaptive_stamped(model, x, y, [target], steps=30)
    assert len(keys) == 1 and len(xs) > 0
    with torch.no_grad():
        assert (model(torch.from_numpy(xs)).argmax(1).numpy() == target).all()
    none, no_keys = adaptive_stamped(model, x[y != 3], y[y != 3], [3], steps=30)  # no image of label 3
    assert none.shape == (0, *x.shape[1:]) and no_keys == []


@pytest.mark.parametrize("kw, match", [({"alpha": 0.0}, "alpha"), ({"alpha": 1.0}, "alpha"),
                                       ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"weight": -1.0}, "weight")])
def test_bad_settings_are_refused(demo, kw, match):
    model, x, y, target = demo
    with pytest.raises(ValueError, match=match):
        AdaptiveKey(**kw).fit(model, x, y, target)


def test_the_scan_weights_its_checks_with_the_key(demo):
    """``build_profile(adaptive_steps=100)`` on the demo model (Neural Cleanse at 100 rounds names the target)
    plays the adaptive attacker against the suspect label and reports which share of the key's stamped images
    each check saw; the profile's weights are the ones it reports (the floor: tests/online/test_ensemble.py)."""
    from guard.scan import NeuralCleanse, build_profile

    model, x, y, target = demo
    profile, summary = build_profile(model, x, y, progress=False, adaptive_steps=100,
                                     nc=NeuralCleanse(seed=0, max_rounds=100, progress=False))
    key = summary["adaptive_key"]
    assert target in key["labels"] and key["success"][key["labels"].index(target)] >= 0.2 and key["steps"] == 100
    assert list(key["seen"]) == list(profile.checks) and max(key["seen"].values()) >= 0.3
    weights = profile.tensors["ensemble.weights"]
    np.testing.assert_allclose(weights, list(summary["ensemble"]["weights"].values()), atol=1e-4)
    assert weights.max() == pytest.approx(1.0) and weights.min() >= 0.0


def test_the_default_scan_plays_no_adaptive_attacker(demo_scan):
    assert json.loads(demo_scan.proc.stdout)["adaptive_key"] is None
