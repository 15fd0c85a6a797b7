"""Networks users deploy besides the demo net: a CIFAR-style ResNet-18 layout, an all-convolutional
net without ``nn.Linear``, a net that normalises its input inside ``forward``, and a small ViT.

The convolutional ones are trained once per session on the glyph task with a 3x3 BadNets patch (clean
accuracy and attack success floors asserted first), written as a user's model file (the ResNet file
defines its blocks beside the network), then loaded, scanned and guarded with no architecture-specific
flag. The ViT is checked for what guard must do with a token model (find its head, read its first
block's tokens as the inner layer and every block's token statistics, scan and guard it) on a briefly
trained copy; detection is asserted on a transformer of another layout (timm's names, tokens averaged
instead of a class token, ``tests/nets/timm_vit.py``) trained to the glyph task (depth 2, 4000 images,
25 epochs: about 75 s on two cores, so tests/conftest.py's ``vit_world`` is built by a background job).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from arch_helpers import ARCHS

from guard import Guard, load_model
from guard.data import load_npz
from guard.model import FeatureTap, feature_layer, inner_layer, inner_layer_reason, token_blocks, token_map


@pytest.fixture(scope="session")
def arch_profiles(arch_worlds, tmp_path_factory):
    """Each world scanned with default checks and a shortened Neural Cleanse (40 rounds)."""
    from guard.scan import NeuralCleanse, build_profile

    out = {}
    for name, w in arch_worlds.items():
        model = load_model(w.model_file, w.weights)
        x, y = load_npz(w.clean)
        profile, _ = build_profile(model, x, y, fpr=0.01, seed=0, progress=False,
                                   nc=NeuralCleanse(seed=0, max_rounds=40, progress=False))
        out[name] = profile.save(tmp_path_factory.mktemp("profiles") / name)
    return out


@pytest.mark.parametrize("name", list(ARCHS))
def test_worlds_meet_their_floors(arch_worlds, name):
    w = arch_worlds[name]
    assert w.clean_accuracy >= 0.85, (name, w.clean_accuracy)
    assert w.attack_success >= 0.9, (name, w.attack_success)


def test_the_network_is_picked_among_its_blocks(arch_worlds):
    notes: list[str] = []
    model = load_model(arch_worlds["resnet"].model_file, arch_worlds["resnet"].weights, notes=notes)
    assert type(model).__name__ == "ResNet18"
    assert notes and "ResNet18" in notes[0] and "BasicBlock" in notes[0]


def test_two_unrelated_networks_are_told_apart_by_the_weights(tmp_path):
    src = ("from torch import nn\n"
           "class A(nn.Module):\n    def __init__(self):\n        super().__init__(); self.fc = nn.Linear(4, 2)\n"
           "    def forward(self, x): return self.fc(x.flatten(1))\n"
           "class B(nn.Module):\n    def __init__(self):\n        super().__init__(); self.fc = nn.Linear(8, 2)\n"
           "    def forward(self, x): return self.fc(x.flatten(1))\n")
    (tmp_path / "m.py").write_text(src)
    torch.save({"fc.weight": torch.zeros(2, 8), "fc.bias": torch.zeros(2)}, tmp_path / "w.pt")
    notes: list[str] = []
    assert type(load_model(tmp_path / "m.py", tmp_path / "w.pt", notes=notes)).__name__ == "B"
    assert "weights fit" in notes[0]
    torch.save({"x": torch.zeros(1)}, tmp_path / "none.pt")
    from guard import ModelError

    with pytest.raises(ModelError, match="--model-class"):
        load_model(tmp_path / "m.py", tmp_path / "none.pt")


def test_a_head_without_linear_is_found_by_a_probe_forward(arch_worlds):
    model = load_model(arch_worlds["allconv"].model_file, arch_worlds["allconv"].weights)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    name, _ = feature_layer(model, input_shape=(3, 32, 32))
    assert name == "classifier"
    x = torch.rand(1, 3, 32, 32)
    assert inner_layer(model, x) == "body.14"  # before the 1x1 classifier, not the class maps


def test_token_models_read_their_first_block_as_the_inner_layer(tmp_path):
    from guard.demo.world import build
    from guard.profile import Profile
    from guard.scan import NeuralCleanse, build_profile

    w = build(tmp_path / "vit", net="vit", seed=1, epochs=1, n_train=300, n_clean=300, n_holdout=100, DEPTH=2)
    model = load_model(w.model_file, w.weights)
    assert feature_layer(model)[0] == "head"
    assert token_blocks(model, torch.rand(1, 3, 32, 32), "head") == ["blocks.0", "blocks.1"]
    assert inner_layer(model, torch.rand(1, 3, 32, 32)) == "blocks.0"
    x, y = load_npz(w.clean)
    profile, _ = build_profile(model, x, y, seed=0, progress=False, nc=NeuralCleanse(max_rounds=3, progress=False))
    profile.save(tmp_path / "p")
    loaded = Profile.load(tmp_path / "p")
    assert loaded.inner_layer == "blocks.0"
    assert {"consistency", "inner_knn", "token"} <= set(loaded.checks) and not loaded.checks_off
    assert loaded.token_blocks == ["blocks.0", "blocks.1"]
    shown = subprocess.run([sys.executable, "-m", "guard.cli", "inspect", str(tmp_path / "p")], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "inner layer blocks.0" in shown.stdout
    assert "token statistics at blocks blocks.0, blocks.1" in shown.stdout
    guard = Guard(model, loaded)
    xh = load_npz(w.holdout)[0][:8]
    decisions = guard.predict(xh)
    assert len(decisions) == 8 and all(d.verdict in ("pass", "rejected") for d in decisions)
    # the single-input path (raw token map pooled in the scorer) scores as the batch path does (the stateful
    # trigger memory left out: what it compares a query with depends on what it saw before)
    stateless = Guard(model, loaded, memory=False)
    one = np.concatenate([stateless.run(xh[i:i + 1]).scores for i in range(4)])
    np.testing.assert_allclose(one, stateless.run(xh[:4]).scores, rtol=1e-4, atol=1e-5)


class _LooseBlocks(torch.nn.Module):
    """A token model whose two blocks are attributes, not items of a sequence."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.first = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16))
        self.second = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16))
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.second(t + self.first(t)).mean(1))


def test_a_token_model_without_a_block_sequence_says_which_option_helps():
    model, x = _LooseBlocks(), torch.rand(2, 3, 32, 32)
    assert inner_layer(model, x) is None
    assert "token model" in inner_layer_reason(model, x) and "--inner-layer" in inner_layer_reason(model, x)
    assert inner_layer(model, x, "first") == "first"
    with FeatureTap(model, inner=model.first) as tap, torch.no_grad():
        model(x)
    assert tuple(tap.inner.shape) == (2, 32, 16, 1)  # (N, T, D) as (N, 2D, T, 1)


def test_a_token_map_pools_to_each_dimensions_mean_largest_and_smallest_value():
    from guard.online.kernels import pool

    t = torch.randn(3, 7, 5)
    g = pool(token_map(t).numpy())
    np.testing.assert_allclose(g[:, :5], t.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[:, 10:15], t.amax(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(g[:, 15:], -t.amin(1).numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", list(ARCHS))
def test_guard_stops_the_trigger_at_a_calibrated_clean_rate(arch_worlds, arch_profiles, name):
    """Patch trigger stopped >= 90%; held-out clean rejection at most 4% at a calibrated 1%.

    The goal is the calibrated rate plus one point; with 600 calibration images these nets land at
    1-3.2% on 500 held-out ones, so the floor guards against regressions while the calibration of
    the ensemble's tail on small clean sets is improved.
    """
    from guard.profile import Profile

    w = arch_worlds[name]
    model = load_model(w.model_file, w.weights)
    guard = Guard(model, Profile.load(arch_profiles[name]))
    xh, _ = load_npz(w.holdout)
    xt, _ = load_npz(w.triggered)
    clean_flagged = np.mean([d.verdict != "pass" for d in guard.predict(xh)])
    stopped = np.mean([d.verdict != "pass" for d in guard.predict(xt)])
    assert stopped >= 0.9, (name, stopped)
    assert clean_flagged <= 0.04, (name, clean_flagged)


def test_guard_stops_a_patch_trigger_on_a_vit(vit_world):
    """Triggered inputs stopped at <= 3% of held-out clean ones, calibrated at 1% (measured on this
    world, trained on one thread: 100% stopped at 1.3% of clean, accuracy 0.886; on two threads 1.0%;
    the floor leaves room for another CPU's rounding).

    The head's features of a triggered input look like the target class's; the trigger's token stands
    out from the clean tokens at its position at every block (the token check), and the ensemble
    weights its checks by how the scan's reversed triggers move them, so the others do not drown it.
    """
    from guard.scan import NeuralCleanse, build_profile

    w = vit_world
    assert w.clean_accuracy >= 0.85 and w.attack_success >= 0.95, (w.clean_accuracy, w.attack_success)
    model = load_model(w.model_file, w.weights)
    x, y = load_npz(w.clean)
    profile, summary = build_profile(model, x, y, fpr=0.01, seed=0, progress=False,
                                     nc=NeuralCleanse(seed=0, max_rounds=40, progress=False))
    weights = summary["ensemble"]["weights"]
    assert max(weights, key=weights.get) == "token", weights
    assert profile.token_blocks == ["blocks.0", "blocks.1"] and profile.feature_layer == "head"
    guard = Guard(model, profile)
    xh, _ = load_npz(w.holdout)
    xt, _ = load_npz(w.triggered)
    clean_flagged = float(np.mean(guard.run(xh).verdict_codes != 0))
    stopped = float(np.mean(guard.run(xt).verdict_codes != 0))
    assert stopped >= 0.95 and clean_flagged <= 0.03, (stopped, clean_flagged)


def test_cli_scans_a_resnet_file_without_flags_and_says_which_class(arch_worlds, tmp_path):
    w = arch_worlds["resnet"]
    p = subprocess.run([sys.executable, "-m", "guard.cli", "scan", "--model-file", str(w.model_file), "--weights",
                        str(w.weights), "--data", str(w.clean), "--out", str(tmp_path / "p"), "--json",
                        "--max-rounds", "4", "--no-warp"], capture_output=True, text=True, timeout=600)
    assert p.returncode in (0, 1), p.stderr
    assert "model class ResNet18" in p.stderr
