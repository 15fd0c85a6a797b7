"""The white-box attacker: its torch surrogate reproduces the guard's statistic, and optimising the
trigger against it lowers the statistic while the backdoor keeps firing; the real guard judges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.whitebox import SURROGATES, Budget, Surrogate, attack_guard


@pytest.fixture(scope="module")
def setup(demo_world, demo_profile):
    from guard import load_model
    from guard.data import load_npz
    from guard.online import Guard
    from guard.profile import Profile

    model = load_model(demo_world.model_file, demo_world.weights)
    guard = Guard(model, Profile.load(demo_profile), mode="enforce", verify=False)
    xc, yc = load_npz(demo_world.clean)
    xh, yh = load_npz(demo_world.holdout)
    atk = demo_world.attack
    return model, guard, atk, xc[atk.victims(yc)][:200], xh[atk.victims(yh)][:120], xh[:60]


def test_surrogate_reproduces_the_guards_statistic(setup):
    model, guard, atk, _, x_eval, clean = setup
    sur = Surrogate(guard)
    assert sorted(sur.in_surrogate + list(sur.not_in_surrogate)) == sorted(guard.names)
    assert set(sur.in_surrogate) == {n for n in guard.names if n in SURROGATES}
    x = np.concatenate([clean, atk.stamp(x_eval[:60])])
    with torch.no_grad():
        s, _ = sur.statistic(torch.from_numpy(x))
    real = guard.run(x).statistic
    assert np.corrcoef(s.numpy(), real)[0, 1] >= 0.99
    # the smoothed calibration count is what differs; above the threshold the tails agree closely
    hi = real > guard.ensemble.threshold_
    assert hi.sum() >= 30 and np.median(np.abs(s.numpy()[hi] - real[hi]) / real[hi]) <= 0.05


def test_optimised_trigger_lowers_the_statistic_and_keeps_the_target(setup):
    model, guard, atk, x_att, x_eval, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    r = attack_guard(model, atk, guard, x_att, x_eval, budgets=(Budget(40, 1.0),), seed=0)
    base, (b,) = r["baseline"], r["budgets"]
    assert base["attack_success_bare"] >= 0.95 and base["rejection_rate"] >= 0.95
    assert b["surrogate_statistic_mean"] <= 0.85 * base["surrogate_statistic_mean"]
    assert b["guard_statistic_mean"] <= 0.85 * base["guard_statistic_mean"]  # the real guard agrees
    assert b["attack_success_bare"] >= 0.7
    for key in ("residual_attack_success", "rejection_rate"):
        assert 0.0 <= b[key] <= 1.0
    assert b["residual_attack_success"] <= b["attack_success_bare"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    short = [attack_guard(model, atk, guard, x_att, x_eval[:30], budgets=(Budget(5, 1.0),), seed=0)["budgets"][0]
             for _ in range(2)]
    assert short[0]["surrogate_statistic_mean"] == pytest.approx(short[1]["surrogate_statistic_mean"], rel=1e-4)


def test_an_unknown_check_is_left_out_of_the_surrogate_and_named(setup):
    from guard.online import Guard

    model, guard, atk, _, x_eval, _ = setup
    g = Guard(model, guard.profile, mode="enforce", verify=False)
    g.checks[0].name = "mystery"  # a check this attacker has no re-implementation of
    sur = Surrogate(g)
    assert list(sur.not_in_surrogate) == ["mystery"] and "mystery" not in sur.in_surrogate
    with torch.no_grad():
        s, logits = sur.statistic(torch.from_numpy(atk.stamp(x_eval[:8])))
    assert s.shape == (8,) and torch.isfinite(s).all()
