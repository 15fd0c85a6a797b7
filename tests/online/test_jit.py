"""The compiled scorer (guard/online/scoring.py, the range kernel of guard/inputs.py): same numbers and
decisions as the numpy path, used where it applies, and a clean fallback without numba."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from guard import Guard, InputError, Profile, _numba, load_model
from guard.data import load_npz
from guard.inputs import _in_unit_range, _numpy_in_unit_range, validate_batch

needs_numba = pytest.mark.skipif(not _numba.available(), reason="numba not installed or GUARD_JIT=0")


@pytest.fixture(scope="module")
def setup(demo_world, demo_profile):
    model = load_model(demo_world.model_file, demo_world.weights)
    profile = Profile.load(demo_profile)
    return model, profile, load_npz(demo_world.holdout)[0], load_npz(demo_world.triggered)[0]


def _per_check(guard: Guard, x: np.ndarray) -> np.ndarray:
    rec = guard._forward(x)
    return np.stack([c.score(rec) for c in guard.checks], axis=1)


def test_batch_1_scores_contributions_and_statistic_are_the_batch_paths(setup):
    """One input goes through the scorer that pools the inner layer itself; a batch through the one that
    reads the pooled Record: the same kernels, so the same numbers up to rounding."""
    model, profile, xc, xt = setup
    guard = Guard(model, profile)
    assert guard.names == ["feature", "knn", "consistency", "inner_knn", "neuron", "overlap"]
    batch = np.ascontiguousarray(np.concatenate([xc[:40], xt[:40]]))
    ref = _per_check(guard, batch)
    ref_c, ref_stat = guard.ensemble.evaluate(ref)
    with guard.session():
        for i in range(len(batch)):
            one = batch[i:i + 1]
            logits, features, inner = guard._tapped(one)
            s, contrib, stat = guard._score_one(one, logits, features, inner)
            np.testing.assert_allclose(s, ref[i:i + 1], rtol=1e-3, atol=1e-4)
            # inside the calibration sample a contribution is a step function of the score's rank:
            # a rounding difference can move it one step (log((r + 1) / r), r >= 100 there)
            np.testing.assert_allclose(contrib, ref_c[i:i + 1], atol=0.02)
            assert stat.shape == (1,) and float(stat[0]) == pytest.approx(float(contrib.sum()), abs=1e-4)
            assert float(stat[0]) == pytest.approx(float(ref_stat[i]), abs=0.05)


def test_batch_1_runs_decide_as_the_batch(setup):
    model, profile, xc, xt = setup
    guard = Guard(model, profile)
    assert guard.memory is not None, "the scan's default memory watches its suspect label"
    batch = np.concatenate([xc[:32], xt[:32]])
    guard.memory.reset()  # the same queries in the same order meet the same memory
    alone = [guard.run(x[None]) for x in batch]
    guard.memory.reset()
    together = guard.run(batch)
    assert [r.verdicts[0] for r in alone] == together.verdicts
    for i, r in enumerate(alone):
        np.testing.assert_allclose(r.scores, together.scores[i:i + 1], rtol=1e-3, atol=1e-4)
        assert r.decisions[0].reasons == together.decisions[i].reasons
    assert sum(r.verdicts[0] == "rejected" for r in alone[32:]) >= 30  # the triggered half is stopped


def test_a_union_rule_profile_takes_the_same_scorer(setup):
    model, profile, xc, _ = setup
    old = dataclasses.replace(profile, ensemble=None, memory=None,
                              tensors={k: v for k, v in profile.tensors.items() if not k.startswith("ensemble.")})
    guard = Guard(model, old)
    assert guard.ensemble.method == "union" and guard.run(xc[:1]).verdicts == ["pass"]


def test_guard_jit_0_disables_numba_and_the_guard_still_decides(setup, demo_world, demo_profile):
    code = ("import numpy as np, sys\n"
            "from guard import _numba, Guard, Profile, load_model\n"
            "from guard.data import load_npz\n"
            "assert not _numba.available()\n"
            f"m = load_model({str(demo_world.model_file)!r}, {str(demo_world.weights)!r})\n"
            f"g = Guard(m, Profile.load({str(demo_profile)!r}))\n"
            f"x = load_npz({str(demo_world.triggered)!r})[0][:5]\n"
            "assert g.run(x[:2]).verdicts == ['rejected'] * 2\n"
            f"x = load_npz({str(demo_world.triggered)!r})[0][:5]\n"
            "print(','.join(g.run(x[i:i + 1]).verdicts[0] for i in range(5)))\n")
    env = dict(os.environ, GUARD_JIT="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split(",") == ["rejected"] * 5


@pytest.mark.parametrize("value,message", [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (-np.inf, "NaN or inf"),
                                           (-0.01, "must lie in"), (1.01, "must lie in")])
@pytest.mark.parametrize("contiguous", [True, False])
def test_the_range_check_refuses_every_bad_value(value, message, contiguous):
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    x[1, 2, 7, 7] = value
    if not contiguous:
        x = np.asfortranarray(x)
    with pytest.raises(InputError, match=message):
        validate_batch(x)


def test_the_range_check_agrees_with_numpy():
    rng = np.random.default_rng(1)
    for _ in range(200):
        x = rng.random((1, 3, 4, 4)).astype(np.float32)
        if rng.random() < 0.5:
            x.reshape(-1)[rng.integers(48)] = rng.choice([np.nan, np.inf, -1e-7, 1.0000001, 0.0, 1.0])
        assert _in_unit_range(x) == _numpy_in_unit_range(x)
    assert _in_unit_range(np.zeros((1, 1, 2, 2), np.float32)) and _in_unit_range(np.ones((1, 1, 2, 2), np.float32))


@needs_numba
@pytest.mark.parametrize("knn,consistency", [(True, True), (False, False)])
def test_compiled_path_covers_profiles_with_fewer_checks(clean_world, knn, consistency):
    """Profiles without the knn and consistency checks (and, when the short scan flags nothing, without
    the neuron and overlap ones): the kernel skips what is absent and still matches the per-check path."""
    from guard.scan import NeuralCleanse, build_profile

    model = load_model(clean_world.model_file, clean_world.weights)
    x, y = load_npz(clean_world.clean)
    profile, _ = build_profile(model, x[:400], y[:400], fpr=0.01, knn=knn, consistency=consistency,
                               nc=NeuralCleanse(seed=0, max_rounds=10, progress=False), progress=False)
    guard = Guard(model, profile)
    assert guard.names[0] == "feature" and ("knn" in guard.names) == knn
    assert ("consistency" in guard.names) == consistency
    assert guard.memory is not None  # the default memory's two columns follow the checks'
    for i in range(10):
        one = np.ascontiguousarray(x[400 + i:401 + i])
        res = guard.run(one)
        assert res.scores.shape == (1, len(guard.names) + 2)
        np.testing.assert_allclose(res.scores[:, :len(guard.names)], _per_check(guard, one), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(res.statistic, guard.ensemble.statistic(_per_check(guard, one)), atol=0.05)


@needs_numba
def test_without_a_writable_cache_the_kernels_compile_per_process(monkeypatch):
    """numba raises at decoration time when no cache location is writable (a read-only install run by
    a user without a home); guard must still import and compile in memory."""
    real = _numba.njit
    asked = []

    def njit(**options):
        asked.append(options.get("cache"))
        if options.get("cache"):
            def refuse(fn):
                raise RuntimeError(f"cannot cache function {fn.__name__!r}: no locator available for file 'x'")
            return refuse
        return real(**options)

    monkeypatch.setattr(_numba, "njit", njit)
    add_one = _numba.compiled(nogil=True)(lambda a: a + 1)
    assert asked == [True, False] and add_one(1) == 2


def test_scorer_digest_follows_the_loaded_code_not_the_file(tmp_path, monkeypatch):
    """The compiled scorer's on-disk cache is keyed by a digest of the kernels' code: the code this process
    loaded, so a process that imported a module before its file changed does not file its old kernels
    under the new file's key."""
    import importlib
    import sys

    from guard.online.scoring import _source_digest

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "guard_digest_probe.py"
    src.write_text("def k(p, x, pred, f, g):\n    return 1.0\n")
    mod = importlib.import_module("guard_digest_probe")
    monkeypatch.setitem(sys.modules, "guard_digest_probe", mod)
    before = _source_digest(mod.k)
    src.write_text("def k(p, x, pred, f, g):\n    return 20.0 + x[0]\n")
    assert _source_digest(mod.k) == before  # the file changed; the loaded code did not
    mod = importlib.reload(mod)
    assert _source_digest(mod.k) != before
