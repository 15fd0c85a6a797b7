"""How far a purification's clean-accuracy drop can be trusted: the confidence bound on the held-out images,
the note when they are too few to resolve the bound, and a cross-fitted drop measured on every clean image.

:func:`~guard.purify.purify` selects a state on a held-out quarter of the clean images: with 200 images that is
50, one image is 2 points, and the 95% upper bound of the drop (:func:`drop_upper_bound`) is at least 7 points
however well the purification did. Cross-fitting (:func:`cross_fitted_drop`) uses every image: the images are dealt into
``folds`` stratified folds; for each fold the same method learns and selects (on its own held-out share) from
the other folds only, and the fold's images are judged by the state it selected, against the original model.
Every image is judged once by a purification that neither learned from it nor selected on it, so the pooled
drop has all N images behind it (0.5 points each with 200) and its Clopper-Pearson bound all N too.

What it measures is the method as run on ``(folds - 1) / folds`` of the images, which is what the written
model is (it learned from three quarters and selected on the fourth), not the one model written: with a few
hundred images the runs differ (the folds of one purification selected states that lost 0 to 10 points on
their own images), so the pooled figure is the method's cost and its spread, and it is reported, not used to
refuse. Measured against the written models' drop on test images (docs/benchmarks.md, 'The drop on every
image: cross-fitting'), its 95% upper bound held on every run and is about half as wide as the held-out
quarter's, while neither point figure predicts a single model's drop to better than 1-2 points. The evidence
(the reversed triggers) is the main run's, found on the learning images: reversing a trigger trains nothing,
so it does not bias the folds' accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from guard.data import stratified_folds
from guard.errors import InputError
from guard.model import predict
from guard.purify.base import MIN_PER_CLASS, Purifier
from guard.purify.evidence import Evidence


def drop_upper_bound(n: int, broken: int, fixed: int, *, confidence: float = 0.95) -> float | None:
    """A one-sided upper confidence bound of the clean-accuracy drop on unseen images, from ``n``
    held-out images of which the purification ``broke`` (right before, wrong after) and ``fixed``
    (the reverse) some. The drop is the difference of two per-image probabilities; each gets an exact
    (Clopper-Pearson) bound at half the error rate, so the pair holds at ``confidence``. With 50 images
    and none broken it is 7.1 points: what 50 images can vouch for. None without images."""
    from scipy.stats import beta

    if n <= 0:
        return None
    a = (1 - confidence) / 2
    hi = 1.0 if broken >= n else float(beta.ppf(1 - a, broken + 1, n - broken))
    lo = 0.0 if fixed <= 0 else float(beta.ppf(a, fixed, n - fixed + 1))
    return max(hi - lo, (broken - fixed) / n)


def resolution_note(held_out: int, max_drop: float) -> str | None:
    """A warning when the held-out images are too few to resolve the bound: one image's share of them is
    at least half of ``max_drop`` (with 50 held-out images one image is 2 points)."""
    if held_out <= 0 or 1 / held_out < max_drop / 2:
        return None
    return (f"{held_out} held-out images measure the accuracy drop in steps of {100 / held_out:.1f} points "
            f"against a bound of {100 * max_drop:g}: the drop on unseen data can be several times larger; "
            f"give more clean images (or a larger --holdout, or --cross-fit) for a bound that means what it says")


@dataclass
class CrossFit:
    """A cross-fitted drop (:func:`cross_fitted_drop`): ``judged`` images over the folds whose purification kept a
    state, of which it ``broke`` and ``fixed`` some against the original; ``refused`` the folds where the
    method kept no state within its own bound (their images are not judged); ``per_fold`` each fold's figures."""

    folds: int
    images: int
    judged: int
    broken: int
    fixed: int
    refused: list[int] = field(default_factory=list)
    per_fold: list[dict] = field(default_factory=list)

    @property
    def drop(self) -> float | None:
        """The pooled drop (a fraction), None when no fold was judged."""
        return (self.broken - self.fixed) / self.judged if self.judged else None

    @property
    def upper_95(self) -> float | None:
        return drop_upper_bound(self.judged, self.broken, self.fixed)

    @property
    def fold_drops(self) -> list[float]:
        """The judged folds' own drops (the spread of the method's runs)."""
        return [r["drop"] for r in self.per_fold if r["ok"]]

    def as_dict(self) -> dict:
        return asdict(self) | {"drop": self.drop, "upper_95": self.upper_95,
                               "resolution": 1 / self.judged if self.judged else None}

    def summary(self) -> str:
        """One line for the CLI: the pooled drop, what one image is worth, the bound, the folds' spread and any
        refused folds."""
        head = f"cross-fitted over {self.images} images ({self.folds} folds, each purified on the others)"
        if not self.judged:
            return f"{head}: every fold refused (no state within the bound), so no image vouches for the drop"
        refused = (f"; {len(self.refused)} fold(s) refused, their {self.images - self.judged} images not judged"
                   if self.refused else "")
        drops = self.fold_drops
        spread = f"; its runs lost {100 * min(drops):.1f} to {100 * max(drops):.1f}" if drops else ""
        return (f"{head}: the method loses {100 * self.drop:.1f} points on images it never saw (one image "
                f"{100 / self.judged:.2f} points), 95% upper bound {100 * self.upper_95:.1f} points{spread}{refused}")


def validate_folds(y: np.ndarray, k: int, folds: int) -> None:
    """InputError unless ``folds`` is 0 (off) or at least 2 and each fold's learning part keeps
    :data:`~guard.purify.base.MIN_PER_CLASS` images of every class."""
    if folds == 0:
        return
    if folds < 2 or folds > 20:
        raise InputError(f"--cross-fit takes 0 (off) or 2 to 20 folds, got {folds}")
    counts = np.bincount(y, minlength=k)
    need = int(np.ceil(MIN_PER_CLASS * folds / (folds - 1)))
    worst = int(counts.argmin())
    if counts[worst] < need:
        raise InputError(f"cross-fitting with {folds} folds needs at least {need} clean images per class (each "
                         f"fold learns from the others); class {worst} has {int(counts[worst])}: use fewer folds "
                         f"or more images")


def cross_fitted_drop(model: nn.Module, x: np.ndarray, y: np.ndarray, make: Callable[[], Purifier], *,
                      evidence: Evidence | None = None, folds: int = 4, seed: int = 0,
                      progress: Callable[[int, dict], None] | None = None) -> CrossFit:
    """The drop of ``make()`` (a fresh, unfitted purifier per fold) measured on every image of ``(x, y)``
    (see the module): fold ``j``'s images are judged by the state the purifier fitted on the other folds
    selected. ``progress(j, row)`` is called after each fold. ``model`` is not modified."""
    original = predict(model.eval(), x) == y
    parts = stratified_folds(y, folds, seed=seed)
    out = CrossFit(folds, len(y), 0, 0, 0)
    for j, part in enumerate(parts):
        rest = np.setdiff1d(np.arange(len(y)), part)
        est = make().fit(model, x[rest], y[rest], evidence=evidence)
        row = {"fold": j, "images": int(len(part)), "selected": est.selected_, "ok": bool(est.ok_)}
        if est.ok_:
            after = predict(est.model_, x[part]) == y[part]
            broken, fixed = int((original[part] & ~after).sum()), int((~original[part] & after).sum())
            out.judged += len(part)
            out.broken += broken
            out.fixed += fixed
            row |= {"broken": broken, "fixed": fixed, "drop": (broken - fixed) / len(part)}
        else:
            out.refused.append(j)
        out.per_fold.append(row)
        if progress is not None:
            progress(j, row)
    return out
