"""The trajectory check: ``guard scan --trajectory`` stores it in the profile, the Guard scores it in its own
forward pass (batch 1 as in a batch, hooks removed afterwards), rejects triggered inputs under the reason
``trajectory`` within the profile's FPR on clean ones, and refuses a profile or model it does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.errors import ModelError, ProfileError
from guard.online.trajectory import Trajectory


@pytest.fixture(scope="module")
def scanned(demo_world, tmp_path_factory):
    """The demo model scanned as a user adds the check: ``guard scan --trajectory`` (short budget, no warp)."""
    from cli_helpers import run_cli

    from guard import load_model
    from guard.data import load_npz
    from guard.profile import Profile

    out = tmp_path_factory.mktemp("trajectory") / "profile"
    proc = run_cli("scan", "--model-file", str(demo_world.model_file), "--weights", str(demo_world.weights),
                   "--data", str(demo_world.clean), "--out", str(out), "--trajectory", "--max-rounds", "20",
                   "--no-warp", "--json")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    model = load_model(demo_world.model_file, demo_world.weights)
    xh, yh = load_npz(demo_world.holdout)
    return model, Profile.load(out), out, proc, xh, yh, demo_world.attack


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_scan_stores_the_check_and_inspect_shows_it(scanned):
    import json

    from cli_helpers import run_cli

    _, profile, out, proc, _, _, _ = scanned
    t = profile.trajectory
    assert len(t["layers"]) >= 4 and t["per_class"] == 20
    assert t["fpr"] == pytest.approx(profile.fpr / 2)  # on top of the ensemble's
    refs = profile.tensors["trajectory.ref_labels"]
    assert 10 * len(np.unique(refs)) <= len(refs) <= 20 * len(np.unique(refs))
    assert json.loads(proc.stdout)["trajectory"]["references"] == len(refs)
    text = run_cli("inspect", str(out)).stdout
    assert f"trajectory check: {len(t['layers'])} layers, {len(refs)} references" in text


def test_the_guard_rejects_triggered_inputs_by_their_trajectory_within_the_fpr(scanned):
    """Measured on the demo world: 87.5% of the patch-triggered held-out inputs over the trajectory's threshold;
    clean held-out images rejected by the guard as a whole at about the profile's 1%."""
    from guard.online import Guard

    model, profile, _, _, xh, yh, attack = scanned
    guard = Guard(model, profile, mode="enforce", memory=False)
    assert guard.trajectory is not None and guard._extra_names[-1] == "trajectory"
    before = _hooks(model)
    clean = guard.run(xh[:400])
    pos = attack.stamp(xh[attack.victims(yh)][:200])
    triggered = guard.run(pos)
    assert _hooks(model) == before, "the trajectory's hooks are removed after every call"
    j = clean.names.index("trajectory")
    assert triggered.over[:, j].mean() >= 0.7
    assert (triggered.verdict_codes == 1).mean() >= 0.95
    assert (clean.verdict_codes == 1).mean() <= 0.03
    one = np.concatenate([guard.run(xh[i:i + 1]).scores[:, j] for i in range(8)])
    np.testing.assert_allclose(one, clean.scores[:8, j], rtol=1e-5)  # batch 1 scores as in a batch
    shadow = Guard(model, profile, mode="shadow", memory=False).run(pos[:20])
    assert set(shadow.verdict_codes[shadow.over[:, j]]) <= {3}, "shadow mode flags, never rejects"
    off = Guard(model, profile, mode="enforce", memory=False, trajectory=False).run(xh[:2])
    assert "trajectory" not in off.names


def test_the_profile_round_trip_scores_as_the_fitted_check(scanned):
    model, profile, _, _, xh, yh, _ = scanned
    fitted = Trajectory().fit(model, xh[:300], yh[:300]).infer_threshold(xh[300:500], fpr=0.02)
    # the references are correctly classified images of those given, at most 20 per class
    np.testing.assert_array_equal(yh[:300][fitted.reference_index_], fitted.ref_labels_)
    assert np.bincount(fitted.ref_labels_).max() <= 20
    settings, tensors = fitted.to_profile()
    again = Trajectory.from_profile(model, settings, tensors, tuple(xh.shape[1:]))
    np.testing.assert_array_equal(again.score(xh[500:540]), fitted.score(xh[500:540]))
    assert again.threshold_ == fitted.threshold_ and again.layers_ == fitted.layers_


def test_a_profile_without_the_check_or_for_another_model_is_refused(scanned, demo_profile):
    from guard.online import Guard
    from guard.profile import Profile

    model, profile, _, _, xh, _, _ = scanned
    with pytest.raises(ProfileError, match="no trajectory check"):
        Guard(model, Profile.load(demo_profile), memory=False, trajectory=True)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10))
    with pytest.raises(ProfileError, match="not this model's"):
        Trajectory.from_profile(other, *profile.trajectory_state(), tuple(xh.shape[1:]))
    with pytest.raises(ModelError, match="not calibrated"):
        Guard(model, profile, memory=False, trajectory=Trajectory().fit(model, xh[:100]))
