"""The cross-fitted drop: stratified folds partition the images; every image is judged once, by a purification
that neither learned from it nor selected on it; the pooled counts, the bound and the folds' spread follow from
them; ``purify(cross_fit=)`` reports it beside the held-out figure (which still decides), and the CLI prints
the line and refuses bad fold counts with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from guard.data import stratified_folds
from guard.purify import Purifier, drop_upper_bound
from guard.purify.bound import CrossFit, cross_fitted_drop, validate_folds

N, K = 120, 3


class _Lookup(nn.Module):
    """A toy classifier over images that carry their own index in the first pixel: it answers ``labels[i]``
    except on the images its ``broken`` buffer marks, where it answers the next label (a wrong one)."""

    def __init__(self, labels: np.ndarray):
        super().__init__()
        self.register_buffer("labels", torch.as_tensor(labels, dtype=torch.long))
        self.register_buffer("broken", torch.zeros(len(labels), dtype=torch.bool))
        self.scale = nn.Parameter(torch.ones(()))  # something a purifier could tune

    def forward(self, x):
        i = torch.round(x[:, 0, 0, 0] * (len(self.labels) - 1)).long()
        y = torch.where(self.broken[i], (self.labels[i] + 1) % K, self.labels[i])
        return nn.functional.one_hot(y, K).float() * self.scale


def _images(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(n) / (n - 1)
    return x, np.arange(n) % K


class _Spy(Purifier):
    """Records the images it learned from and selected on; its one candidate breaks the images of ``breaks``."""

    seen: list[set[int]] = []

    def __init__(self, *, breaks=(), **kw):
        super().__init__(**kw)
        self.breaks = list(breaks)

    def propose(self, model, c):
        ids = {int(round(float(v) * (N - 1))) for v in np.concatenate([c.x[:, 0, 0, 0], c.selection.x_val[:, 0, 0, 0]])}
        _Spy.seen.append(ids)
        model.broken[self.breaks] = True
        c.offer("broke", model)


def test_stratified_folds_partition_every_class_evenly():
    y = np.repeat(np.arange(4), [20, 15, 13, 7])
    parts = stratified_folds(y, 4, seed=3)
    assert len(parts) == 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))  # each image once
    for c in range(4):
        sizes = [int((y[p] == c).sum()) for p in parts]
        assert max(sizes) - min(sizes) <= 1, (c, sizes)
    assert all(np.array_equal(a, b) for a, b in zip(parts, stratified_folds(y, 4, seed=3)))  # seeded
    assert not all(np.array_equal(a, b) for a, b in zip(parts, stratified_folds(y, 4, seed=4)))
    with pytest.raises(ValueError):
        stratified_folds(y, 1)


def test_every_image_is_judged_once_by_a_purification_that_never_saw_it():
    x, y = _images()
    _Spy.seen = []
    cf = cross_fitted_drop(_Lookup(y), x, y, lambda: _Spy(max_drop=0.5, seed=0), folds=K)
    parts = stratified_folds(y, K, seed=0)
    assert len(_Spy.seen) == K
    for part, seen in zip(parts, _Spy.seen):
        assert seen.isdisjoint(part.tolist()) and seen | set(part.tolist()) == set(range(N))
    assert (cf.judged, cf.broken, cf.fixed, cf.refused) == (N, 0, 0, [])
    assert cf.drop == 0.0 and cf.fold_drops == [0.0] * K and cf.upper_95 == drop_upper_bound(N, 0, 0)
    assert [r["images"] for r in cf.per_fold] == [len(p) for p in parts]


def test_the_pooled_drop_counts_what_each_fold_broke():
    """Six images broken by every fold's state: each is judged in its own fold only, so the pooled drop is 6/N
    (5 points); a fold whose state is over its own bound is refused and its images are not judged."""
    x, y = _images()
    breaks = [3, 10, 41, 57, 88, 119]
    cf = cross_fitted_drop(_Lookup(y), x, y, lambda: _Spy(breaks=breaks, max_drop=0.5, seed=0), folds=K)
    assert (cf.judged, cf.broken, cf.fixed) == (N, 6, 0)
    assert cf.drop == pytest.approx(0.05) and sum(r["broken"] for r in cf.per_fold) == 6
    parts = stratified_folds(y, K, seed=0)
    assert cf.fold_drops == [len(set(breaks) & set(p.tolist())) / len(p) for p in parts]
    assert cf.upper_95 > cf.drop and "loses 5.0 points on images it never saw" in cf.summary()
    # with a bound of 0 a fold refuses when its own held-out share holds the broken image; the fold that judges
    # that image learned and selected without it, so it kept its state and counts the image broken
    strict = cross_fitted_drop(_Lookup(y), x, y, lambda: _Spy(breaks=[3], max_drop=0.0, seed=0), folds=K)
    home = next(j for j, p in enumerate(parts) if 3 in p)
    assert home not in strict.refused and strict.broken == 1
    assert strict.judged == N - sum(len(p) for j, p in enumerate(parts) if j in strict.refused)
    assert (f"{len(strict.refused)} fold(s) refused" in strict.summary()) == bool(strict.refused)
    none = CrossFit(K, N, 0, 0, 0, refused=[0, 1, 2])
    assert none.drop is None and none.upper_95 is None and "every fold refused" in none.summary()


def test_fold_counts_are_checked_before_any_work():
    y = np.repeat(np.arange(3), 14)
    validate_folds(y, 3, 0)  # off
    validate_folds(y, 3, 4)  # 14 per class: each fold learns from 10 or 11
    from guard.errors import InputError

    for bad in (1, 21):
        with pytest.raises(InputError, match="0 \\(off\\) or 2 to 20"):
            validate_folds(y, 3, bad)
    with pytest.raises(InputError, match="at least 20 clean images per class"):
        validate_folds(y, 3, 2)


def test_purify_reports_the_cross_fitted_drop_beside_the_held_out_one(demo, monkeypatch):
    """The held-out images decide what is kept: a cross-fitted drop of 5 points is reported, not a refusal; a
    purification the held-out images refused runs no folds."""
    import importlib

    from guard.bench.purification import per_class_subset
    from guard.purify import purify

    purify_module = importlib.import_module("guard.purify.purify")  # the module, not the function it exports
    model, x, y, _, _, profile, _ = demo
    xs, ys = per_class_subset(x, y, 20, seed=0)
    calls = []

    def fake(model, x, y, make, **kw):
        calls.append((len(y), kw["folds"], type(make()).__name__))
        return CrossFit(kw["folds"], len(y), len(y), 10, 0)

    monkeypatch.setattr(purify_module, "cross_fitted_drop", fake)
    quick = {"rescan": False, "online": False, "probe_relapse": False, "progress": False}
    res = purify(model, xs, ys, profile, method="fine-pruning", epochs=0, cross_fit=4, **quick)
    assert calls == [(200, 4, "FinePruning")]
    assert res.ok and res.state_dict is not None
    assert res.details["cross_fitted"]["drop"] == pytest.approx(0.05)
    assert "loses 5.0 points" in res.details["cross_fitted"]["summary"]
    wrecked = purify(model, xs, ys, profile, method="unlearn", lr=1.0, epochs=2, cross_fit=4, **quick)
    assert not wrecked.ok and wrecked.details["cross_fitted"] is None and len(calls) == 1


def test_purify_cli_cross_fits_on_every_image(badnets_world, badnets_profile, tmp_path, guard_cli):
    """``--cross-fit 4`` with 20 images per class: five fine-pruning runs, every one of the 200 images judged by a
    run that never saw it, one image 0.5 points (the held-out quarter alone: 2); the JSON's pooled counts give
    its bound and carry the line the table's output prints. A fold count it cannot take is exit 2 with one line."""
    from guard.bench.purification import per_class_subset
    from guard.data import load_npz

    data = tmp_path / "c20.npz"
    np.savez(data, **dict(zip("xy", per_class_subset(*load_npz(badnets_world.clean), 20, seed=0))))
    common = ["purify", "--model-file", str(badnets_world.model_file), "--weights", str(badnets_world.weights),
              "--data", str(data), "--profile", str(badnets_profile), "--method", "fine-pruning", "--epochs", "0",
              "--no-rescan", "--no-online"]
    proc = guard_cli(*common, "--out", str(tmp_path / "p.pt"), "--cross-fit", "4", "--json")
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    cf = json.loads(proc.stdout)["details"]["cross_fitted"]
    assert cf is not None and cf["folds"] == 4 and cf["images"] == 200
    assert cf["judged"] + sum(r["images"] for r in cf["per_fold"] if not r["ok"]) == 200
    if cf["judged"]:
        assert cf["upper_95"] == pytest.approx(drop_upper_bound(cf["judged"], cf["broken"], cf["fixed"]))
    assert cf["resolution"] == pytest.approx(1 / cf["judged"])
    assert cf["summary"].startswith("cross-fitted over 200 images (4 folds")  # the line the table output prints
    bad = guard_cli(*common, "--out", str(tmp_path / "q.pt"), "--cross-fit", "1")
    assert bad.returncode == 2 and "--cross-fit takes 0 (off) or 2 to 20 folds" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "q.pt").exists()
