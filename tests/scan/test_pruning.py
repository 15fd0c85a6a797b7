"""Repair: unlearning removes the demo backdoor (the attacker's own trigger, not just the reversed
one) at a bounded accuracy cost; Fine-Pruning respects its accuracy bound and keeps every shape;
``guard prune`` writes weights the original model file loads and prints the before/after table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guard.data import load_npz
from guard.demo.train import attack_success
from guard.model import accuracy, fingerprint, load_model
from guard.profile import Profile
from guard.repair.pruning import FinePruning, Unlearning, profile_triggers


@pytest.fixture(scope="module")
def demo(badnets_world, badnets_profile):
    model = load_model(badnets_world.model_file, badnets_world.weights)
    x, y = load_npz(badnets_world.clean)
    xh, yh = load_npz(badnets_world.holdout)
    return model, x, y, xh, yh, Profile.load(badnets_profile), badnets_world.attack


def test_unlearning_removes_the_true_trigger(demo):
    model, x, y, xh, yh, profile, atk = demo
    before_acc, before_asr = accuracy(model, xh, yh), attack_success(model, atk, xh, yh)
    assert before_asr > 0.9
    sha = fingerprint(model)
    labels, masks, patterns = profile_triggers(profile)
    assert labels == [6]
    u = Unlearning(seed=0, progress=False).fit(model, x, y, masks=masks, patterns=patterns)
    assert fingerprint(model) == sha  # the caller's model is untouched
    after_acc, after_asr = accuracy(u.model_, xh, yh), attack_success(u.model_, atk, xh, yh)
    print(f"\nunlearning: clean acc {before_acc:.3f} -> {after_acc:.3f}, true-trigger ASR {before_asr:.3f} -> "
          f"{after_asr:.3f} ({u.seconds_:.1f}s)")
    assert after_asr <= 0.05
    assert before_acc - after_acc <= 0.02


def test_unlearning_is_seeded(demo):
    model, x, y, *_rest = demo
    profile = _rest[2]
    _, masks, patterns = profile_triggers(profile)
    a = Unlearning(seed=3, epochs=1, progress=False).fit(model, x[:300], y[:300], masks=masks, patterns=patterns)
    b = Unlearning(seed=3, epochs=1, progress=False).fit(model, x[:300], y[:300], masks=masks, patterns=patterns)
    for k, v in a.state_dict_.items():
        torch.testing.assert_close(v, b.state_dict_[k], rtol=0, atol=0)


def test_fine_pruning_respects_the_bound_and_keeps_shapes(demo, badnets_world):
    model, x, y, xh, yh, _, atk = demo
    fp = FinePruning(max_drop=0.02, seed=0, progress=False).fit(model, x, y)
    assert fp.layer_ == "features.6"  # DemoNet's last conv
    assert 0 < len(fp.pruned_channels_) < 64
    # every pruning step it kept stayed within the bound on the validation split
    assert all(fp.accuracy_before_ - acc <= 0.02 + 1e-9 for _, acc in fp.history_)
    # pruned channels are zeroed (so they stay dead) and the weights load into the original file
    fresh = load_model(badnets_world.model_file, badnets_world.weights)
    fresh.load_state_dict(fp.state_dict_, strict=True)
    w = fp.state_dict_["features.6.weight"]
    assert torch.all(w[fp.pruned_channels_] == 0)
    assert torch.all(fp.state_dict_["features.6.bias"][fp.pruned_channels_] == 0)
    assert accuracy(model, xh, yh) - accuracy(fresh, xh, yh) <= 0.03
    print(f"\nfine-pruning: {len(fp.pruned_channels_)}/64 channels, holdout acc {accuracy(fresh, xh, yh):.3f}, "
          f"true-trigger ASR {attack_success(fresh, atk, xh, yh):.3f}")


def test_prune_cli_unlearn_writes_loadable_weights_and_table(badnets_world, badnets_profile, tmp_path, guard_cli):
    out = tmp_path / "repaired.pt"
    proc = guard_cli("prune", "--model-file", str(badnets_world.model_file), "--weights", str(badnets_world.weights),
                   "--data", str(badnets_world.clean), "--profile", str(badnets_profile), "--out", str(out),
                   "--method", "unlearn", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(proc.stdout)
    before, after = table["before"], table["after"]
    assert before["verdict"] == "backdoored" and before["suspect_labels"] == [6]
    assert after["verdict"] == "clean", table  # the guard scan of the result finds nothing
    assert before["attack_success"] > 0.9 and after["attack_success"] <= 0.05
    assert before["clean_accuracy"] - after["clean_accuracy"] <= 0.02
    repaired = load_model(badnets_world.model_file, out)  # loads strictly into the original model file
    xh, yh = load_npz(badnets_world.holdout)
    assert attack_success(repaired, badnets_world.attack, xh, yh) <= 0.05
    # human form: the before/after table
    proc = guard_cli("prune", "--model-file", str(badnets_world.model_file), "--weights", str(badnets_world.weights),
                   "--data", str(badnets_world.clean), "--profile", str(badnets_profile), "--out",
                   str(tmp_path / "fp.pt"), "--method", "fine-pruning", "--no-rescan")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "clean accuracy" in proc.stdout and "reversed-trigger attack success" in proc.stdout
    assert "guard scan verdict" in proc.stdout and "not scanned" in proc.stdout


def test_prune_cli_refusals(badnets_world, badnets_profile, tmp_path, guard_cli):
    base = ["prune", "--model-file", str(badnets_world.model_file), "--data", str(badnets_world.clean),
            "--profile", str(badnets_profile)]
    state = torch.load(badnets_world.weights, weights_only=True)
    state["head.bias"] = state["head.bias"] + 0.01
    torch.save(state, tmp_path / "other.pt")
    proc = guard_cli(*base, "--weights", str(tmp_path / "other.pt"), "--out", str(tmp_path / "r.pt"))
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (tmp_path / "exists.pt").write_bytes(b"x")
    proc = guard_cli(*base, "--weights", str(badnets_world.weights), "--out", str(tmp_path / "exists.pt"))
    assert proc.returncode == 2 and "exists" in proc.stderr
    x, y = load_npz(badnets_world.clean)
    y = y.copy()
    y[0] = 10
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    proc = guard_cli("prune", "--model-file", str(badnets_world.model_file), "--weights", str(badnets_world.weights),
                   "--data", str(tmp_path / "bad.npz"), "--profile", str(badnets_profile), "--out",
                   str(tmp_path / "r2.pt"), "--no-rescan")
    assert proc.returncode == 2 and "classes" in proc.stderr, proc.stderr
