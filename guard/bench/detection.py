"""One row's detection figures: the offline scans' verdicts, the online guard per check and combined,
the guard in repair mode, STRIP and ART's STRIP, all on the same clean and triggered inputs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.config import REPORTED_CHECKS, BenchConfig
from guard.bench.evaluation import at_threshold, separation
from guard.bench.strip import Strip, art_strip
from guard.online import Guard
from guard.scan.blend import BlendReversal
from guard.scan.tnd import DFTND, DLTND


def detected(flagged: list[int], target: int) -> bool:
    """An all-to-one attack is detected when its target is flagged; all-to-all (target -1) by any flag."""
    return bool(flagged) if target < 0 else target in flagged


def offline_verdicts(cfg: BenchConfig, model: nn.Module, summary: dict[str, Any], profile_meta: dict[str, Any],
             x_fit: np.ndarray, y_fit: np.ndarray, target: int, num_classes: int) -> dict[str, Any]:
    """Each offline method's verdict on one model."""
    nc_flag = list(summary["suspect_labels"])
    out: dict[str, Any] = {"neural_cleanse": {
        "detected": detected(nc_flag, target), "flagged_labels": nc_flag,
        "seconds": profile_meta["scan"]["seconds"], "steps": profile_meta["scan"]["steps"],
        "target_anomaly_index": summary["anomaly_index"].get(str(target)),
        "target_log_anomaly_index": summary["log_anomaly_index"].get(str(target))}}
    seed = cfg.zoo.seed
    # name: (overrides, fit, (target statistic's key, its value for the fitted estimator, digits))
    methods = {
        "dl_tnd": (cfg.dl_tnd, lambda kw: DLTND(seed=seed, progress=False, **kw).fit(
            model, x_fit, y_fit, num_classes=num_classes), ("target_similarity_q25", lambda e: e.score_, 4)),
        "df_tnd": (cfg.df_tnd, lambda kw: DFTND(seed=seed, progress=False, **kw).fit(
            model, x_fit.shape[1:], num_classes=num_classes), ("target_anomaly_index", lambda e: e.anomaly_index_, 3)),
        "blend": (cfg.blend, lambda kw: BlendReversal(seed=seed, progress=False, **kw).fit(
            model, x_fit, y_fit, num_classes=num_classes), ("target_lead", lambda e: e.lead_, 4)),
    }
    for name, (overrides, fit, (key, stat, digits)) in methods.items():
        if overrides is None:  # skipped in this configuration
            out[name] = None
            continue
        t0 = time.perf_counter()
        est = fit(overrides)
        flagged = list(est.suspect_labels_)
        out[name] = {"detected": detected(flagged, target), "flagged_labels": flagged,
                     "seconds": round(time.perf_counter() - t0, 2),
                     key: round(float(stat(est)[target]), digits) if target >= 0 else None}
    return out


def guard_scores(guard: Guard, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(N, n_checks)`` scores and the verdict's suspect flags of the guard on ``x``."""
    s, flag = [], []
    for i in range(0, len(x), batch):
        res = guard.run(x[i:i + batch])
        s.append(res.scores)
        flag.append(res.verdict_codes != 0)
    return np.concatenate(s), np.concatenate(flag)


def online_figures(guard: Guard, cal_x: np.ndarray, neg: np.ndarray, pos: np.ndarray, fpr: float,
            success: np.ndarray, flip_check: bool = True) -> dict[str, Any]:
    """Per check and combined: AUROC, TPR at 1% FPR, and the deployed thresholds' realised TPR/FPR.

    ``success`` marks the triggered inputs on which the attack works on the bare model; the combined
    figures are also given on those alone (``combined_successful``), since an attack that fails
    needs no stopping and weak attacks otherwise dilute the positives.
    """
    cal_s, _ = guard_scores(guard, cal_x)
    neg_s, neg_flag = guard_scores(guard, neg)
    pos_s, pos_flag = guard_scores(guard, pos)
    out: dict[str, Any] = {name: None for name in REPORTED_CHECKS}
    for j, name in enumerate(guard.names):
        t = guard.thresholds[j]
        out[name] = separation(neg_s[:, j], pos_s[:, j], fpr=fpr) | {
            "calibrated": at_threshold(neg_s[:, j] > t, pos_s[:, j] > t), "threshold": round(float(t), 4)}
    # the guard's own decision statistic (its calibrated ensemble), so the ROC passes through the verdict
    zc_neg, zc_pos = guard.statistic(neg_s), guard.statistic(pos_s)
    out["combined"] = separation(zc_neg, zc_pos, fpr=fpr) | {"verdict": at_threshold(neg_flag, pos_flag),
                                                             "checks": list(guard.names),
                                                             "rule": guard.ensemble.method}
    out["combined_successful"] = (separation(zc_neg, zc_pos[success], fpr=fpr) if success.any()
                                  else {"auroc": None, "tpr_at_1pct_fpr": None}) | {"n": int(success.sum())}
    if flip_check:  # opt-in, not in the guard: see guard.bench.mirror
        from guard.bench.mirror import evaluate

        out["opt_in"] = evaluate(guard.model, cal_x, neg, pos, cal_s, neg_s, pos_s, fpr=fpr)
    return out


def repair_figures(guard: Guard, neg: np.ndarray, y_neg: np.ndarray, pos: np.ndarray, pos_target: np.ndarray,
            model: nn.Module, batch: int = 256) -> dict[str, Any]:
    """Attack success and clean accuracy served by the guard in repair mode (rejected = not served)."""

    def served(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels, rejected, repaired = [], [], []
        for i in range(0, len(x), batch):
            r = guard.run(x[i:i + batch])
            labels.append(r.logits.argmax(1))
            rejected.append(r.verdict_codes == 1)
            repaired.append(r.verdict_codes == 2)
        return np.concatenate(labels), np.concatenate(rejected), np.concatenate(repaired)

    with torch.inference_mode():
        bare_neg = model(torch.from_numpy(neg)).argmax(1).numpy()
        bare_pos = model(torch.from_numpy(pos)).argmax(1).numpy()
    ln, rn, pn = served(neg)
    lp, rp, pp = served(pos)
    acc_before = float((bare_neg == y_neg).mean())
    acc_after = float(((ln == y_neg) & ~rn).mean())
    return {"attack_success_rate": round(float(((lp == pos_target) & ~rp).mean()), 4),
            "attack_success_before": round(float((bare_pos == pos_target).mean()), 4),
            "clean_accuracy": round(acc_after, 4), "clean_accuracy_before": round(acc_before, 4),
            "clean_accuracy_loss_points": round(100 * (acc_before - acc_after), 2),
            "triggered_repaired": round(float(pp.mean()), 4), "triggered_rejected": round(float(rp.mean()), 4),
            "clean_repaired": round(float(pn.mean()), 4), "clean_rejected": round(float(rn.mean()), 4)}


def strip_figures(cfg: BenchConfig, model: nn.Module, pool: np.ndarray, cal: np.ndarray, neg: np.ndarray,
           pos: np.ndarray) -> dict[str, Any]:
    st = Strip(n=cfg.strip_n, frr=cfg.fpr, seed=cfg.zoo.seed).fit(model, pool, cal)
    t0 = time.perf_counter()
    sn, sp = st.score(neg, seed_offset=2), st.score(pos, seed_offset=3)
    per_input_ms = (time.perf_counter() - t0) / (len(neg) + len(pos)) * 1e3
    return separation(sn, sp, fpr=cfg.fpr) | {
        "paper_threshold": at_threshold(sn > st.threshold_, sp > st.threshold_),
        "n": cfg.strip_n, "seconds_per_input_ms": round(per_input_ms, 3), "fit_seconds": round(st.seconds_, 2)}


def art_figures(cfg: BenchConfig, model: nn.Module, pool: np.ndarray, neg: np.ndarray, pos: np.ndarray,
         num_classes: int) -> dict[str, Any]:
    r = art_strip(model, pool, neg, pos, n=cfg.strip_n, far=cfg.fpr, seed=cfg.zoo.seed, num_classes=num_classes)
    return separation(r["neg_scores"], r["pos_scores"], fpr=cfg.fpr) | {
        "art_threshold": at_threshold(r["neg_flagged"], r["pos_flagged"]), "n": cfg.strip_n,
        "seconds": round(r["seconds"], 2), "statistic": "ART 1.x: sum over classes of the entropy across copies"}
