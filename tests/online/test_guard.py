"""The online guard on the demo model: the issue's quality floors, every mode, bad input."""

import numpy as np
import pytest

from guard import Guard, InputError, Profile, ProfileMismatch, load_model
from guard.commands.check import evaluate
from guard.data import load_npz
from guard.train import accuracy


@pytest.fixture(scope="module")
def setup(demo_world, demo_profile):
    model = load_model(demo_world.model_file, demo_world.weights)
    profile = Profile.load(demo_profile)
    clean = load_npz(demo_world.holdout)
    trig = load_npz(demo_world.triggered)
    return model, profile, clean, trig


@pytest.mark.parametrize("mode", ["enforce", "repair"])
def test_quality_floors(setup, mode):
    model, profile, (xc, yc), (xt, yt) = setup
    guard = Guard(model, profile, mode=mode)
    t = evaluate(guard, xt, yt)
    c = evaluate(guard, xc, yc)
    stopped = (t["rejected"] + t["repaired"] * (t["accuracy"] or 0)) / t["n"]
    assert stopped >= 0.95, t
    assert c["rejected"] / c["n"] <= 0.02, c
    assert c["accuracy"] >= accuracy(model, xc, yc) - 0.01, c


def test_shadow_answers_as_the_model_and_flags(setup):
    model, profile, _, (xt, _) = setup
    guard = Guard(model, profile, mode="shadow")
    decisions = guard.predict(xt[:50])
    import torch

    with torch.no_grad():
        bare = model(torch.from_numpy(xt[:50])).argmax(1).numpy()
    assert [d.label for d in decisions] == bare.tolist()
    assert sum(d.verdict == "flagged" for d in decisions) >= 45


def test_rejected_inputs_never_see_the_model_answer(setup):
    model, profile, _, (xt, _) = setup
    for d in Guard(model, profile, mode="enforce").predict(xt[:20]):
        if d.verdict == "rejected":
            assert d.label is None and d.probabilities is None and d.reasons
            assert all("," not in r and ":" not in r for r in d.reasons)


def test_every_decision_has_scores_for_every_check(setup):
    model, profile, (xc, _), _ = setup
    d = Guard(model, profile).predict(xc[:1])[0]
    assert set(profile.meta["checks"]) <= set(d.scores)
    assert d.verdict == "pass" and abs(sum(d.probabilities) - 1) < 1e-4


@pytest.mark.parametrize("bad", [
    np.full((1, 3, 32, 32), np.nan, np.float32),
    np.full((1, 3, 32, 32), 2.0, np.float32),
    np.full((1, 3, 32, 32), -0.1, np.float32),
    np.zeros((1, 1, 32, 32), np.float32),
    np.zeros((3, 32, 32), np.float32),
    np.zeros((0, 3, 32, 32), np.float32),
])
def test_bad_input_is_refused(setup, bad):
    model, profile, _, _ = setup
    with pytest.raises(InputError):
        Guard(model, profile).predict(bad)


def test_refuses_another_model(setup, clean_world):
    _, profile, _, _ = setup
    other = load_model(clean_world.model_file, clean_world.weights)
    with pytest.raises(ProfileMismatch):
        Guard(other, profile)


def test_clean_model_still_gets_a_calibrated_guard(clean_world, tmp_path):
    from guard.scan import build_profile

    model = load_model(clean_world.model_file, clean_world.weights)
    x, y = load_npz(clean_world.clean)
    profile, summary = build_profile(model, x, y, fpr=0.01, progress=False)
    assert summary["suspect_labels"] == []
    assert set(profile.meta["checks"]) == {"feature", "knn"}  # label-agnostic checks only
    xh, yh = load_npz(clean_world.holdout)
    c = evaluate(Guard(model, profile), xh, yh)
    assert c["rejected"] / c["n"] <= 0.02
