"""The online guard on the demo model: its quality floors, every mode, bad input."""

import dataclasses

import numpy as np
import pytest

from guard import Guard, InputError, Profile, ProfileMismatch, load_model
from guard.cli.check import evaluate
from guard.data import load_npz
from guard.model import accuracy


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


def test_clean_model_still_gets_a_calibrated_guard(clean_world, clean_scan):
    model, profile, summary = clean_scan.model, clean_scan.profile, clean_scan.summary
    assert summary["suspect_labels"] == []
    assert set(profile.meta["checks"]) == {"feature", "knn", "consistency", "inner_knn"}  # label-agnostic checks only
    xh, yh = load_npz(clean_world.holdout)
    c = evaluate(Guard(model, profile), xh, yh)
    assert c["rejected"] / c["n"] <= 0.02


def _checks_one_by_one(guard, x):
    rec = guard._forward(x)
    return np.stack([c.score(rec) for c in guard.checks], axis=1)


def test_the_batch_1_fused_scores_are_the_checks_own(setup, clean_world, clean_scan):
    model, profile, (xc, _), (xt, _) = setup
    guard = Guard(model, profile)
    assert guard.names == ["feature", "knn", "consistency", "inner_knn", "neuron", "overlap"]
    for x in list(xc[:20]) + list(xt[:20]):
        one = x[None]
        np.testing.assert_allclose(guard.scores(guard._forward(one)), _checks_one_by_one(guard, one),
                                   rtol=2e-5, atol=2e-5)
    # the fused batch-1 path and the batched path agree on decisions too
    batch = np.concatenate([xc[:16], xt[:16]])
    together = guard.run(batch)
    alone = [guard.run(x[None]) for x in batch]
    assert [r.verdicts[0] for r in alone] == together.verdicts
    # a clean model's profile (no neuron or overlap check) takes the same path
    cm, cp = clean_scan.model, clean_scan.profile
    x, _ = load_npz(clean_world.clean)
    cg = Guard(cm, cp)
    assert cg.names == ["feature", "knn", "consistency", "inner_knn"]
    np.testing.assert_allclose(cg.scores(cg._forward(x[:1])), _checks_one_by_one(cg, x[:1]), rtol=2e-5, atol=2e-5)


def test_a_session_holds_one_hook_and_always_removes_it(setup):
    model, profile, (xc, _), _ = setup
    guard = Guard(model, profile)
    layer, inner = guard._layer_module, guard._inner_module
    before, inner_before = len(layer._forward_pre_hooks), len(inner._forward_hooks)
    outside = guard.run(xc[:4]).scores
    with guard.session():
        assert len(layer._forward_pre_hooks) == before + 1
        assert len(inner._forward_hooks) == inner_before + 1
        with guard.session():  # nested: shares the hook
            assert len(layer._forward_pre_hooks) == before + 1
        np.testing.assert_array_equal(guard.run(xc[:4]).scores, outside)
        assert len(layer._forward_pre_hooks) == before + 1  # run() adds none inside a session
    assert len(layer._forward_pre_hooks) == before
    with pytest.raises(RuntimeError), guard.session():
        raise RuntimeError("boom")
    assert len(layer._forward_pre_hooks) == before and guard._tap is None
    assert len(inner._forward_hooks) == inner_before


def test_suspect_inputs_always_name_a_reason_and_the_ensemble_decides(setup):
    model, profile, (xc, _), (xt, _) = setup
    guard = Guard(model, profile)
    assert guard.ensemble.method == "fisher"
    res = guard.run(np.concatenate([xc[:64], xt[:64]]))
    suspect = res.statistic > res.ensemble_threshold
    np.testing.assert_array_equal(res.verdict_codes != 0, suspect)
    np.testing.assert_array_equal(res.over.any(1), suspect)  # a reason for each suspect input, none for a pass
    for d, stat in zip(res.decisions, res.statistic):
        assert d.scores["ensemble"] == pytest.approx(float(stat), abs=1e-3)


def test_a_profile_from_before_the_ensemble_keeps_the_union_rule(setup):
    """Profiles written before the ensemble (no ``ensemble`` entry) still load and decide as they did:
    suspect when any check is over its own threshold."""
    model, profile, (xc, _), (xt, _) = setup
    old = dataclasses.replace(profile, ensemble=None, memory=None,  # nor the memory, added later still
                              tensors={k: v for k, v in profile.tensors.items() if not k.startswith("ensemble.")})
    guard = Guard(model, old)
    assert guard.ensemble.method == "union"
    x = np.concatenate([xc[:64], xt[:64]])
    res = guard.run(x)
    np.testing.assert_array_equal(res.verdict_codes != 0, (res.scores > guard.thresholds).any(1))
    np.testing.assert_array_equal(res.over, res.scores > guard.thresholds)


def test_unguarded_answers_are_the_bare_models_marked_as_guard_errors(setup):
    import torch

    model, profile, (xc, _), (xt, _) = setup
    guard = Guard(model, profile)
    x = np.concatenate([xc[:3], xt[:3]])
    out = guard.unguarded(x)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    assert [d.label for d in out] == probs.argmax(1).tolist()
    assert all(d.verdict == "error" and d.reasons == ["guard_error"] for d in out)
    np.testing.assert_allclose([d.probabilities for d in out], probs, atol=1e-5)
    assert [d.label for d in out] == [d.label for d in Guard(model, profile, mode="shadow").predict(x)]


def test_guard_docstring_example_runs():
    import doctest

    import guard.online.engine

    assert doctest.testmod(guard.online.engine, raise_on_error=True).failed == 0
