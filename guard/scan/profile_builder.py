"""Offline scan -> profile: Neural Cleanse, suspect neurons, online checks fitted and calibrated."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.data import split, validate_per_class
from guard.errors import InputError
from guard.model import (
    FeatureTap,
    feature_layer,
    fingerprint,
    frozen,
    inner_layer,
    inner_layer_reason,
    num_classes,
    token_blocks,
    validate_labels,
)
from guard.model.tokens import TokenStatistics, pick_blocks
from guard.modes import MEMORY_WATCH
from guard.online.checks import (
    ConsistencyCheck,
    FeatureCheck,
    KNNCheck,
    NeuronCheck,
    OverlapCheck,
    Record,
    TokenCheck,
    pool,
)
from guard.online.checks.inner_knn import InnerKNNCheck
from guard.online.ensemble import FisherEnsemble
from guard.online.policy import validate_mode
from guard.online.scoring import score_checks
from guard.profile import Calibration, LabelScan, Policy, Profile, RepairSettings, Scan
from guard.scan.neural_cleanse import NeuralCleanse, suspect_neurons
from guard.scan.trigger import stamp

UNSUSPECTED_MEMORY_SHARE = 0.1
"""Where the scan suspects no label, the default memory watches every label at this share of the profile's FPR:
a blend-like backdoor's target can escape Neural Cleanse, and the memory's false alarms then cost about what
watching one label of ten at the full FPR does."""

TRAJECTORY_SHARE = 0.5
"""The trajectory check's threshold lets this share of the profile's FPR through, on top of the ensemble's (as
the trigger memory's does): splitting the FPR between the two instead cost the ensemble more on DemoNet than
the trajectory check caught there (docs/benchmarks.md, 'Adaptive attackers')."""

ADAPTIVE_STEPS = 0
"""Adam steps of the scan's own adaptive key per suspect label (:mod:`guard.scan.adaptive_key`; 0, the default,
leaves it off; 300 is what it was measured with, the bench's strongest gray-box budget: at 100 or 50 steps the
ResNet-18 layout's key stayed unmatched and the weights did not move). Off by default because what it gains
is narrow and it costs: on the ResNet-18 layout it raised the share of an evading Adap-Blend key stopped at 1%
of clean from 44% to 50% for 27 s of scan; on DemoNet's patch rows it cost up to half a point; where Neural
Cleanse suspects no label (the blend rows) it does not run; its cost grows with the input (a batch of 32
forward and backward per step). Figures: docs/benchmarks.md, 'The scan's own adaptive attacker'."""

ADAPTIVE_LABELS = 3
"""At most this many suspect labels (in the scan's order) get an adaptive key: each costs ``adaptive_steps``
forward and backward passes of a batch of 32."""

MIN_PER_CLASS = 2
"""Clean images per class ``guard scan`` asks for by default: at 100 classes two per class named the target and
calibrated the guard as well as ten did (docs/benchmarks.md, 'Measurements behind the defaults'); one per
class leaves the trigger reversal or the calibration without the class."""


def validate_adaptive_steps(steps: int | None) -> None:
    """InputError for a negative ``--adaptive-steps``; None is the default (:data:`ADAPTIVE_STEPS`)."""
    if steps is not None and steps < 0:
        raise InputError(f"--adaptive-steps must be >= 0, got {steps}")


def records(model: nn.Module, x: np.ndarray, *, layer: str | None = None, inner: str | None = None,
            tokens: TokenStatistics | None = None, batch_size: int = 256) -> Record:
    """Forward ``x`` in batches with the feature tap (and the inner layer's, pooled, with the token
    statistics ``tokens`` where given); one :class:`Record`."""
    logits, feats, inners = [], [], []
    inner_module = dict(model.named_modules())[inner] if inner else None
    with frozen(model), torch.inference_mode(), FeatureTap(model, layer, inner=inner_module, tokens=tokens) as tap:
        for i in range(0, len(x), batch_size):
            logits.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).numpy())
            feats.append(tap.features.numpy().copy())
            if inner_module is not None:
                inners.append(pool(tap.inner.numpy()))
    return Record(x, np.concatenate(logits), np.concatenate(feats), np.concatenate(inners) if inners else None)


def build_profile(model: nn.Module, x: np.ndarray, y: np.ndarray, *, fpr: float = 0.01, seed: int = 0,
                  mode: str = "enforce", layer: str | None = None, calibration_share: float = 0.5,
                  nc: NeuralCleanse | None = None, source: dict[str, Any] | None = None,
                  progress: bool | None = None, knn: bool = True, consistency: bool = True,
                  inner: str | None = None, folds: int = 5, inner_knn: bool = True,
                  memory: str = "suspects", tokens: bool = True, min_per_class: int = 0,
                  trajectory: bool = False, watch: Sequence[int] = (),
                  adaptive_steps: int = ADAPTIVE_STEPS) -> tuple[Profile, dict[str, Any]]:
    """Scan ``model`` on clean (x, y) and return the profile and a JSON summary.

    A share ``1 - calibration_share`` of the clean data (stratified, seeded) drives the trigger
    reversal. The online checks are fitted on all of it and calibrated by cross-fitting: in each of
    ``folds`` seeded folds, checks fitted on the other folds score the fold's images, so every clean
    image gives a calibration score from checks that did not see it, and all of them calibrate
    each check's own threshold at ``fpr`` (they name the reasons of a verdict) and the ensemble that
    decides (:class:`~guard.online.ensemble.FisherEnsemble`, one threshold that lets ``fpr`` of them
    through), whose checks are weighted by how well they separate the scan's reversed triggers,
    stamped on clean images, from clean scores. Cross-fitting because a threshold calibrated on one
    held-out half (a few hundred images) let clearly more new clean images through than the calibrated
    ``fpr`` on three networks, and cross-fitting came closer (figures: docs/benchmarks.md, 'Measurements
    behind the defaults'). ``knn`` adds the nearest-neighbour feature check
    (:class:`~guard.online.checks.KNNCheck`), which covers input-specific triggers that no reversed
    trigger describes (WaNet, input-aware); ``consistency`` the inner-layer check
    (:class:`~guard.online.checks.ConsistencyCheck`, on the layer ``inner`` or the one
    :func:`~guard.model.inner_layer` finds), which covers mild whole-image triggers (Blended); with both,
    the nearest-neighbour check on that inner layer (:class:`~guard.online.checks.InnerKNNCheck`) sees
    the Blended trigger best; ``inner_knn=False`` leaves that one out (it is on by default because its
    cost is small: side by side, the guard's overhead with and without it was within the measurement's
    noise; figures: docs/benchmarks.md, 'Measurements behind the defaults'). Each costs one small
    matrix product per query. On a token model (a vision transformer, whose inner layer is its first
    block) ``tokens`` adds the ``token`` check (:class:`~guard.online.checks.TokenCheck`): each of up to
    four blocks' largest deviation of a token from the clean tokens at its position
    (:class:`~guard.model.tokens.TokenStatistics`, fitted on all the clean images), which sees a patch
    trigger's token at whichever block it shows; it costs one ``(T, D) x (D, D)`` product per block.
    ``min_per_class`` refuses (InputError) data with fewer clean images of some class (0, the default here:
    no minimum; ``guard scan`` asks for :data:`MIN_PER_CLASS`). ``memory`` adds the stateful trigger memory
    (:class:`~guard.online.memory.TriggerMemory`, seeded with ``seed``, calibrated on all the clean images
    at ``fpr``), which catches a fixed trigger from its fourth query on: ``"suspects"`` (the default) watches
    the scan's suspect labels, or, where it suspects none, every label at :data:`UNSUSPECTED_MEMORY_SHARE` of
    ``fpr``; ``"all"`` every label at ``fpr``; ``"off"`` none. Either default way its false alarms cost about
    a tenth of ``fpr`` of all traffic (``fpr`` times the suspects' share); figures and cost in
    docs/benchmarks.md. ``trajectory`` adds the trajectory check (:class:`~guard.online.trajectory.Trajectory`:
    up to 20 references per class from the reversal's share, calibrated on every other clean image), which
    follows each input's rank among clean images of its predicted class through every layer: it catches triggers
    re-optimised to match clean statistics in aggregate, at the cost of hooks on every traced layer and a
    nearest-neighbour search per layer (figures and cost in docs/benchmarks.md, 'Adaptive attackers'); its
    false alarms add :data:`TRAJECTORY_SHARE` of ``fpr`` to the ensemble's. ``watch`` names labels the memory
    watches beside the scan's suspects at the full ``fpr``: the labels an earlier scan suspected, when this
    model is the one ``guard purify`` made of that one. A purified model's scan may suspect nothing, or a
    cheap natural label instead of the attack's target, and a key optimised on the attacked weights still
    reaches its target on the purified one (figures in docs/benchmarks.md, 'Against the purified model').
    ``adaptive_steps`` (default :data:`ADAPTIVE_STEPS`, off; 300 as measured) has the scan play the attacker who knows
    guard, for each of up to :data:`ADAPTIVE_LABELS` suspect labels: a blend key optimised to reach the label
    while matching the clean label's statistics at every layer (:class:`~guard.scan.adaptive_key.AdaptiveKey`),
    whose stamped images weight the ensemble's checks beside the reversed triggers (a check an adapted trigger
    dilutes weighs less); it costs ``adaptive_steps`` forward and backward passes of 32 images per label.

    >>> import numpy as np, torch
    >>> from guard import build_profile
    >>> from guard.scan import NeuralCleanse
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3)).eval()
    >>> x = np.random.default_rng(0).random((120, 1, 8, 8), dtype=np.float32)
    >>> y = net(torch.from_numpy(x)).argmax(1).numpy()
    >>> profile, summary = build_profile(net, x, y, fpr=0.05, progress=False,
    ...                                  nc=NeuralCleanse(max_rounds=2, progress=False))
    >>> profile.input_shape, profile.fpr, "feature" in profile.checks
    ((1, 8, 8), 0.05, True)
    """
    if not 0 < fpr < 0.5:
        raise InputError(f"--fpr must be in (0, 0.5), got {fpr}")
    if memory not in MEMORY_WATCH:
        raise InputError(f"--memory must be one of {', '.join(MEMORY_WATCH)}, got {memory!r}")
    watch = sorted({int(w) for w in watch})
    if watch and memory == "off":
        raise InputError("--watch names labels for the trigger memory, which --memory off leaves out")
    validate_mode(mode)
    validate_adaptive_steps(adaptive_steps)
    t0 = time.perf_counter()
    model.eval()
    layer_name, _ = feature_layer(model, layer, input_shape=x.shape[1:])
    k = num_classes(model, x)
    probe = torch.from_numpy(x[:1])
    inner_name = inner_layer(model, probe, inner, features=layer_name) if consistency else None
    checks_off = {"consistency": "turned off (--no-consistency)"} if not consistency else {}
    if consistency and inner_name is None:
        checks_off["consistency"] = inner_layer_reason(model, probe, features=layer_name) or "no inner layer"
    if knn and inner_name is None:
        checks_off["inner_knn"] = checks_off["consistency"]
    elif knn and not inner_knn:
        checks_off["inner_knn"] = "turned off (inner_knn=False)"
    validate_labels(y, k)
    validate_per_class(y, k, min_per_class)
    if watch and not 0 <= watch[0] <= watch[-1] < k:
        raise InputError(f"--watch labels must be in 0..{k - 1} (the model has {k} classes), got {watch}")
    token_stats = None
    if tokens and inner_name is not None:
        blocks = token_blocks(model, probe, layer_name)
        if inner_name in blocks:  # a token model read at its first block (not a map the user named)
            token_stats = TokenStatistics().fit(model, x, pick_blocks(blocks))
    x_fit, y_fit, x_cal, y_cal = split(x, y, 1 - calibration_share, seed=seed)
    if len(x_cal) < 20 or len(x_fit) < 20:
        raise InputError(f"need at least 40 clean images to scan and calibrate, got {len(x)}")
    nc = nc or NeuralCleanse(seed=seed, progress=progress)
    nc.fit(model, x_fit, num_classes=k)
    suspects = list(nc.suspect_labels_)
    neurons = {}
    rows = [nc.labels_.index(s) for s in suspects]
    for s, r in zip(suspects, rows):
        neurons[s] = suspect_neurons(model, x_fit, nc.masks_[r], nc.patterns_[r], layer=layer_name)

    def fitted(rec: Record, labels: np.ndarray) -> list:
        """The online checks fitted on ``rec`` (clean images with their ``labels``), in scoring order."""
        out = [FeatureCheck().fit(rec, labels)]
        if knn:
            out.append(KNNCheck(seed=seed).fit(rec))
        if inner_name is not None:
            out.append(ConsistencyCheck().fit(rec, labels))
            if knn and inner_knn:
                out.append(InnerKNNCheck(seed=seed).fit(rec))
            if token_stats is not None:
                out.append(TokenCheck(blocks=len(token_stats.blocks_)).fit(rec))
        if suspects:
            out.append(NeuronCheck([neurons[s] for s in suspects], rec.features.shape[1]).fit(rec))
            out.append(OverlapCheck(nc.masks_[rows], nc.patterns_[rows]).fit(rec))
        return out

    rec_all = records(model, x, layer=layer_name, inner=inner_name, tokens=token_stats)
    checks = fitted(rec_all, y)
    cal_scores = _cross_fitted_scores(fitted, rec_all, y, folds=folds, seed=seed)
    for j, c in enumerate(checks):
        c.calibrate(cal_scores[:, j], fpr=fpr)
    stamped = _reversed_trigger_scores(model, checks, nc, x, y, layer=layer_name, inner=inner_name,
                                       tokens=token_stats, seed=seed)
    traj = None
    if trajectory:
        from guard.online.trajectory import Trajectory

        traj = Trajectory(seed=seed).fit(model, x_fit, y_fit)
        others = np.delete(np.arange(len(x_fit)), traj.reference_index_)  # every clean image but the references
        traj.infer_threshold(np.concatenate([x_fit[others], x_cal]), fpr=fpr * TRAJECTORY_SHARE)
    adaptive, keys = None, []
    if suspects and adaptive_steps:
        from guard.scan.adaptive_key import adaptive_stamped

        xs, keys = adaptive_stamped(model, x, y, [int(s) for s in suspects[:ADAPTIVE_LABELS]],
                                    steps=adaptive_steps, seed=seed)
        if len(xs):
            adaptive = score_checks(checks, records(model, xs, layer=layer_name, inner=inner_name,
                                                    tokens=token_stats))
    ensemble = FisherEnsemble().fit(cal_scores, anomalies=stamped, adaptive=adaptive)
    ensemble.infer_threshold(cal_scores, fpr=fpr)
    realised = float((ensemble.statistic(cal_scores) > ensemble.threshold_).mean())

    tensors: dict[str, np.ndarray] = {
        "masks": nc.masks_[[nc.labels_.index(s) for s in suspects]] if suspects else
        np.zeros((0, 1, *x.shape[2:]), np.float32),
        "all_masks": nc.masks_, "all_patterns": nc.patterns_,
        "fill": x_fit.mean(axis=(0, 2, 3)).astype(np.float32),
    }
    for s, idx in neurons.items():
        tensors[f"neurons.{s}"] = idx.astype(np.int64)
    min_l1 = min((float(nc.l1_norms_[nc.labels_.index(s)]) for s in suspects), default=None)
    # a few seed pixels, each dilated to its 3x3 neighbourhood: enough to cover a compact trigger,
    # few enough to leave the object intact (the demo's figures: docs/benchmarks.md, 'Measurements behind
    # the defaults')
    repair_pixels = int(max(4, round(0.5 * min_l1))) if min_l1 else int(max(4, 0.005 * x.shape[2] * x.shape[3]))
    seconds = time.perf_counter() - t0
    scan = Scan(method="neural_cleanse", threshold=float(nc.threshold_),
                per_label=[LabelScan(**r) for r in nc.per_label()], seed=seed, steps=int(nc.steps_),
                seconds=round(float(nc.seconds_), 2), samples={"fit": len(x_fit), "calibration": len(x)})
    profile = Profile(model_sha256=fingerprint(model), input_shape=tuple(x.shape[1:]), num_classes=k,
                      feature_layer=layer_name, inner_layer=inner_name, fpr=float(fpr), checks={},
                      policy=Policy(mode=mode), repair=RepairSettings(pixels=repair_pixels), scan=scan,
                      suspect_labels=[int(s) for s in suspects],
                      suspect_neurons={str(s): idx.tolist() for s, idx in neurons.items()},
                      calibration=Calibration(samples=len(x), realised_fpr=realised),
                      created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      source=source or {}, checks_off=checks_off, tensors=tensors)
    if token_stats is not None:
        profile.set_tokens(*token_stats.to_profile())
    for c in checks:
        profile.add_check(c.name, *c.to_profile())
    profile.set_ensemble(*ensemble.to_profile())
    if traj is not None:
        profile.set_trajectory(*traj.to_profile())
    if memory != "off":
        from guard.online.memory import TriggerMemory

        watched = sorted({int(s) for s in suspects} | set(watch)) if memory == "suspects" else []
        labels = watched or None  # None: every label
        mem_fpr = fpr if memory == "all" or watched else fpr * UNSUSPECTED_MEMORY_SHARE
        profile.memory = TriggerMemory(seed=seed, labels=labels).fit(x).infer_threshold(x, fpr=mem_fpr).to_settings()
    meta = profile.to_json()
    summary = {
        "suspect_labels": suspects,
        "anomaly_index": {str(lab): round(float(a), 4) for lab, a in zip(nc.labels_, nc.anomaly_index_)},
        "log_anomaly_index": {str(lab): round(float(a), 4) for lab, a in zip(nc.labels_, nc.log_anomaly_index_)},
        "l1_norm": {str(lab): round(float(v), 3) for lab, v in zip(nc.labels_, nc.l1_norms_)},
        "thresholds": {n: {"threshold": e.threshold, "fpr": profile.fpr} for n, e in profile.checks.items()},
        "ensemble": meta["ensemble"] | {"fpr": profile.fpr, "checks": list(profile.checks),
                                        "weights": dict(zip(profile.checks, np.round(ensemble.weights_, 4).tolist()))},
        "adaptive_key": None if not keys else {
            "labels": [k.label_ for k in keys], "success": [round(k.success_, 4) for k in keys],
            "steps": int(adaptive_steps), "alpha": keys[0].alpha,
            "seen": None if ensemble.adaptive_rates_ is None else
            dict(zip(profile.checks, np.round(ensemble.adaptive_rates_, 4).tolist()))},
        "fpr": fpr,
        "calibration_realised_fpr": realised,
        "model_sha256": meta["model_sha256"],
        "seconds": round(seconds, 2),
        "memory": profile.memory,
        "trajectory": None if traj is None else {"layers": len(traj.layers_), "references": len(traj.ref_labels_),
                                                 "threshold": traj.threshold_, "fpr": traj.fpr_},
    }
    return profile, summary


def _reversed_trigger_scores(model: nn.Module, checks: list, nc: NeuralCleanse, x: np.ndarray, y: np.ndarray, *,
                              layer: str, inner: str | None, tokens: TokenStatistics | None, seed: int,
                              per_label: int = 64) -> np.ndarray:
    """``(M, n_checks)`` scores of clean images carrying the scan's reversed triggers, one per optimised
    label, each on up to ``per_label`` seeded images of other labels: inputs the model is known to treat
    abnormally, which weight the ensemble's checks (:func:`~guard.online.ensemble.separation_weights`)."""
    rng = np.random.default_rng(seed + 17)
    parts = []
    for row, lab in enumerate(nc.labels_):
        others = np.flatnonzero(y != lab)
        if len(others) == 0:
            continue
        idx = rng.choice(others, min(per_label, len(others)), replace=False)
        parts.append(stamp(x[idx], nc.masks_[row], nc.patterns_[row]))
    if not parts:
        return np.zeros((0, len(checks)), np.float32)
    return score_checks(checks, records(model, np.concatenate(parts), layer=layer, inner=inner, tokens=tokens))


def _cross_fitted_scores(fitted, rec: Record, y: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """``(N, n_checks)`` scores of every image of ``rec`` by checks ``fitted`` on the other folds."""
    n = len(y)
    folds = int(min(max(folds, 2), n))
    order = np.random.default_rng(seed).permutation(n)
    out: np.ndarray | None = None
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        s = score_checks(fitted(rec.take(rest), y[rest]), rec.take(part))
        if out is None:
            out = np.zeros((n, s.shape[1]), np.float32)
        out[part] = s
    return out

