"""``purify()``: remove a suspected backdoor from a model within a bound on the clean-accuracy drop,
measured on clean images the method never learns from, and report what it can estimate of the
residual backdoor.

The clean images are split (stratified, seeded) into a part the method learns from and a held-out
part. Every method (:data:`METHODS`, one estimator per module) proposes candidate states; each
candidate's clean accuracy on the held-out part is measured, candidates whose drop exceeds
``max_drop`` are discarded and among the rest the one the known triggers move least wins
(:mod:`guard.purify.selection`). When no candidate is within the bound ``PurifyResult.ok`` is false
and the CLI writes nothing and exits 1 with the figures.

The held-out images resolve the drop in steps of one image; the result also carries a one-sided 95%
upper confidence bound of the drop on unseen images (:func:`~guard.purify.bound.drop_upper_bound`), which says
how much the measured figure can be trusted with the images given, and, with ``cross_fit``, the drop measured
on every clean image by cross-fitting (:mod:`guard.purify.bound`).

Minimum clean data: :data:`~guard.purify.base.MIN_PER_CLASS` images per class (a quarter is held
out, so the bound is measured on at least 2 per class).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import numpy as np
from torch import nn

from guard.data import split
from guard.errors import InputError
from guard.model import num_classes, validate_labels
from guard.purify.anp import ANPPruning
from guard.purify.auto import Auto
from guard.purify.base import Purifier, validate_data
from guard.purify.bound import cross_fitted_drop, drop_upper_bound, resolution_note, validate_folds
from guard.purify.combined import CombinedUnlearning
from guard.purify.evidence import Evidence
from guard.purify.fine_pruning import FinePruning
from guard.purify.norm_tuning import NormTuning
from guard.purify.relapse import relapse, shallow_note
from guard.purify.residual import blend_residual, residual_evidence, warp_residual
from guard.purify.result import PurifyResult
from guard.purify.rnp import RNPPruning
from guard.purify.sau import SharedAdversarialUnlearning
from guard.purify.triggers import Trigger, anywhere, stamp_one, worst_success
from guard.purify.unlearning import NCUnlearning

METHODS: dict[str, type[Purifier]] = {cls.method: cls for cls in (
    Auto, CombinedUnlearning, SharedAdversarialUnlearning, NormTuning, RNPPruning, ANPPruning, NCUnlearning,
    FinePruning)}
"""``guard purify --method`` names and their estimators."""


def make_purifier(method: str, **params) -> Purifier:
    """The estimator of ``method`` with those of ``params`` it takes (the CLI's ``--share``,
    ``--epochs``, ``--lr`` mean something to some methods only; None means the method's default)."""
    if method not in METHODS:
        raise InputError(f"unknown purification method {method!r} ({', '.join(METHODS)})")
    cls = METHODS[method]
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= {n for n, p in inspect.signature(klass.__init__).parameters.items()
                         if p.kind is p.KEYWORD_ONLY}
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})


def online_rejection(model: nn.Module, profile, x: np.ndarray, y: np.ndarray,
                     trigs: list[tuple[int, Trigger]], *, seed: int = 0) -> tuple[float | None, float]:
    """Share of ``x`` stamped with ``trigs`` (images not of the trigger's label) and of clean ``x`` that a
    :class:`guard.online.Guard` built from ``profile`` on ``model`` in enforce mode does not pass. The
    profile's checks were calibrated on the original model; on a purified one they are applied as they
    are (``verify=False``), which is what serving the purified model with the old profile would do."""
    import torch

    from guard.online.engine import Guard

    guard = Guard(model, profile, mode="enforce", verify=False)
    clean = float((guard.run(x).verdict_codes != 0).mean())
    if not trigs:
        return None, clean
    g = torch.Generator().manual_seed(seed)
    stamped = [torch.stack([stamp_one(xi, t, g) for xi in torch.from_numpy(x[y != s])]) for s, t in trigs]
    xs = torch.cat(stamped).numpy()
    return float((guard.run(xs).verdict_codes != 0).mean()), clean


def purify(model: nn.Module, x: np.ndarray, y: np.ndarray, profile, *, method: str = "auto",
           max_drop: float = 0.02, holdout_share: float = 0.25, share: float | None = None,
           epochs: int | None = None, lr: float | None = None, seed: int = 0, rescan: bool = True,
           online: bool = True, nc=None, progress: bool | None = None, device: str = "cpu",
           search_evidence: bool = True, probe_relapse: bool = True, cross_fit: int = 0) -> PurifyResult:
    """Purify ``model`` with ``method`` (:data:`METHODS`) within ``max_drop`` of clean accuracy and measure
    before and after on the held-out part: clean accuracy, the reversed triggers' attack success where
    they were found and pasted anywhere, the online checks' rejection of held-out images stamped with
    them (``online``), and (``rescan``) a fresh Neural Cleanse scan of the result (verdict, suspect
    labels, largest anomaly index) with the suspect labels' triggers reversed again from two starts and
    judged against the original scan's other labels (:mod:`guard.purify.residual`): either finding keeps
    the verdict at ``backdoored``. The evidence is :meth:`Evidence.gather`'s: the profile's reversed triggers
    (Neural Cleanse's, else the warp fields ``guard scan`` stored), else, with ``search_evidence``, what the
    warp reversal (when the scan did not run it) and then the blend reversal flag on the learning images
    (Neural Cleanse's scan misses blended and warped backdoors); what it holds is unlearned, and a reversal's
    finding is judged after by the same reversal on the purified model. ``probe_relapse`` adds, for both models,
    the reversed triggers' success after one epoch of re-tuning with 1% of the learning images stamped with them
    (:func:`~guard.purify.relapse.relapse`: how deep the repair went). ``share``, ``epochs`` and ``lr`` go to
    the methods that take them (None: each method's default). ``device`` (``cpu`` or ``cuda[:N]``) is where
    the Neural Cleanse optimisations run: the combined method's re-reversals and the rescan.

    ``cross_fit`` (0: off, else a number of folds, at least 2) measures the method's drop on every clean image as
    well (:func:`~guard.purify.bound.cross_fitted_drop`: the method run again once per fold, learning and selecting
    on the other folds, judged on the fold): ``details["cross_fitted"]``, reported beside the held-out figure
    (the held-out images still decide what is kept; :mod:`guard.purify.bound` says why).
    """
    from guard.scan.neural_cleanse import NeuralCleanse

    model.eval()
    k = num_classes(model, x)
    validate_labels(y, k)
    params = {"max_drop": max_drop, "holdout_share": holdout_share, "seed": seed, "progress": progress,
              "device": device, "share": share, "epochs": epochs, "lr": lr}
    est = make_purifier(method, **params)
    validate_data(y, k, method)
    validate_folds(y, k, cross_fit)
    x_tr, y_tr, xv, yv = split(x, y, 1 - holdout_share, seed=seed)
    evidence, source = Evidence.gather(model, x_tr, y_tr, profile, search=search_evidence, seed=seed,
                                       progress=progress)
    est.fit(model, x_tr, y_tr, evidence=evidence, validation=(xv, yv))
    fixed = evidence.triggers(jitter=0)
    moved = anywhere(fixed)

    def side(mdl: nn.Module, acc: float) -> dict:
        return {"clean_accuracy": acc,
                "attack_success": worst_success(mdl, xv, yv, fixed, seed=seed),
                "attack_success_anywhere": worst_success(mdl, xv, yv, moved, seed=seed)}

    suspected = sorted({int(v) for v in profile.suspect_labels} | set(evidence.labels))
    before = side(model, est.accuracy_before_) | {
        "verdict": "backdoored" if suspected else "clean",
        "suspect_labels": suspected,
        "anomaly_index": _max_or_none([s.anomaly_index for s in profile.scan.per_label]) if profile.scan else None,
        "log_anomaly_index": _max_or_none([s.log_anomaly_index for s in profile.scan.per_label])
        if profile.scan else None}
    purified = est.model_
    after = side(purified, est.accuracy_after_) if purified is not None else {
        "clean_accuracy": est.accuracy_after_, "attack_success": None, "attack_success_anywhere": None}
    after |= {"verdict": None, "suspect_labels": None, "anomaly_index": None, "log_anomaly_index": None}
    if probe_relapse:
        before["relapse"] = relapse(model, x_tr, y_tr, xv, yv, fixed, seed=seed)
        after["relapse"] = relapse(purified, x_tr, y_tr, xv, yv, fixed, seed=seed) if purified is not None else None
    if online:
        before["online_rejection"], before["online_false_rejection"] = online_rejection(
            model, profile, xv, yv, fixed, seed=seed)
        if purified is not None:
            after["online_rejection"], after["online_false_rejection"] = online_rejection(
                purified, profile, xv, yv, fixed, seed=seed)
    residual = None
    if rescan and purified is not None:
        scanner = nc or NeuralCleanse(seed=seed, progress=progress, device=device)
        scanner.fit(purified, x_tr, num_classes=k)
        suspects = [int(s) for s in scanner.suspect_labels_]
        if evidence.kind == "blend":
            residual = blend_residual(purified, x_tr, y_tr, evidence.labels, seed=seed)
        elif evidence.kind == "warp":
            residual = warp_residual(purified, x_tr, y_tr, evidence.labels, seed=seed)
        else:
            residual = residual_evidence(purified, x_tr, profile, evidence.labels, num_classes=k, seed=seed,
                                         device=device, threshold=float(scanner.threshold_))
        if residual is not None and residual["suspected"]:
            suspects = sorted(set(suspects) | {int(s) for s, f in residual["labels"].items() if f["suspected"]})
        after["verdict"] = "backdoored" if suspects else "clean"
        after["suspect_labels"] = suspects
        after["anomaly_index"] = float(np.max(scanner.anomaly_index_))
        after["log_anomaly_index"] = float(np.max(scanner.log_anomaly_index_))
    n, broken, mended = est.paired_counts()
    details = {"method": est.method, "held_out": int(len(yv)), "trained_on": int(len(y_tr)),
               "max_accuracy_drop": max_drop, "accuracy_drop": est.accuracy_before_ - est.accuracy_after_,
               "accuracy_resolution": 1 / max(len(yv), 1),
               "accuracy_drop_upper_95": drop_upper_bound(n, broken, mended) if est.ok_ else None,
               "held_out_broken": broken, "held_out_fixed": mended,
               "resolution_note": resolution_note(len(yv), max_drop), "selected": est.selected_,
               "triggers": evidence.labels, "candidates": est.history_, "seconds": est.seconds_,
               "residual": residual, "evidence": source, "rescan_watch": rescan_watch(profile, evidence.labels),
               "relapse_note": shallow_note(before.get("relapse"), after.get("relapse")), **est.details_}
    if cross_fit:  # only worth running when the held-out images kept a state
        cf = cross_fitted_drop(model, x, y, lambda: make_purifier(method, **params), evidence=evidence,
                               folds=cross_fit, seed=seed) if est.ok_ else None
        details["cross_fitted"] = None if cf is None else cf.as_dict() | {"summary": cf.summary()}
    if online:
        details["online_note"] = ("the profile's checks as calibrated on the original model, applied to the "
                                  "purified one unchanged (rescan before serving the purified model)")
    return PurifyResult(method, est.ok_, before, after, est.state_dict_, details)


def rescan_watch(profile, labels: Iterable[int]) -> list[int]:
    """The labels the purified model's rescan keeps its trigger memory on (``guard scan --watch``): every label
    ``profile`` holds suspect (:meth:`~guard.profile.Profile.watched_labels`) and the purification evidence's
    ``labels``. A key optimised on the attacked weights still aims at them, and the purified model's own scan
    rarely names them (docs/benchmarks.md, 'The rescan watching the original target')."""
    return sorted(set(profile.watched_labels()) | {int(s) for s in labels})


def _max_or_none(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return max(vals) if vals else None
