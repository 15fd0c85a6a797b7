"""``guard bench``: the attack zoo against the offline scans, the online guard, repair and STRIP.

For every attack of the zoo (and a clean model, the negative class of the offline scans) one small
seeded DemoNet is trained on the glyph world (:mod:`guard.bench.models`, cached), then:

* **offline**: the profile is built (:func:`guard.scan.build_profile`: Neural Cleanse, suspect
  neurons, every online check fitted and calibrated at ``fpr``) and DL-TND / DF-TND run on it; each
  says whether it flags the attack's target (for all-to-all, any label);
* **online**: the guard scores ``n_eval`` clean test images and ``n_eval`` triggered test images of
  other classes than the target (:mod:`guard.bench.evaluation`: AUROC and TPR at 1% FPR per check and
  for the combined verdict, plus the deployed verdict's realised TPR/FPR);
* **repair**: the guard in ``repair`` mode on the same inputs: attack success (the attacker's label
  served) and clean accuracy (a rejected clean input counts as wrong) after repair;
* **STRIP** (:mod:`guard.bench.strip`) and, where installed, ART's STRIP, on the same inputs.

Then the performance figures on the BadNets model: the guard's overhead over the bare forward
(:func:`guard.bench.overhead.measure_overhead`, batch 1 and 32), batched Neural Cleanse over the
per-label loop (:mod:`guard.bench.nc_speed`), scan seconds, and TorchServe throughput guarded over the
baseline handler (:mod:`guard.bench.serving`). :func:`run_bench` returns the JSON-ready results;
:mod:`guard.bench.report` renders the Markdown table and the target checklist.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.evaluation import at_threshold, separation
from guard.bench.models import ZooConfig, zoo_model
from guard.bench.peers.evaluate import best_peer, peer_rows
from guard.bench.report import targets
from guard.bench.strip import Strip, art_available, art_strip
from guard.data import split
from guard.demo.attacks import Attack
from guard.demo.attacks.zoo import zoo_data
from guard.demo.glyphs import glyphs
from guard.model import num_classes
from guard.online import Guard
from guard.scan import build_profile
from guard.scan.blend import BlendReversal
from guard.scan.neural_cleanse import NeuralCleanse
from guard.scan.tnd import DFTND, DLTND

SCHEMA_VERSION = 1
ALL_ATTACKS = ("badnets", "blended", "sig", "wanet", "input_aware", "trojannn", "all_to_all", "adap_blend",
               "adap_patch", "tact", "bpp", "label_consistent", "badnets_random")
#: The quick preset's sample: the classic attacks and the two adaptive attacks built against feature-space checks.
QUICK_ATTACKS = ("badnets", "blended", "sig", "wanet", "input_aware", "trojannn", "all_to_all", "adap_patch",
                 "adap_blend")
#: The networks the full preset trains every attack on (names of guard.demo.attacks.zoo.NETS).
ALL_NETS = ("demo_net", "resnet18")
#: Online checks that every row reports (null where the profile has none, e.g. no suspect label).
REPORTED_CHECKS = ("feature", "knn", "consistency", "neuron", "overlap")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a benchmark run depends on; ``preset`` names one of :data:`PRESETS`.

    Every attack is trained and measured on each of ``nets`` (``zoo.net`` is replaced by each in turn);
    the performance figures are measured on the first.
    """

    preset: str
    attacks: tuple[str, ...]
    zoo: ZooConfig
    nets: tuple[str, ...] = ("demo_net",)
    n_clean: int = 1000  # clean images for the scan (half) and the calibration (other half)
    n_eval: int = 500  # clean and triggered test images per attack
    fpr: float = 0.01
    nc_max_rounds: int = 200
    dl_tnd: dict[str, Any] | None = field(default_factory=dict)  # DLTND keyword overrides; None: skip
    df_tnd: dict[str, Any] | None = field(default_factory=dict)  # DFTND keyword overrides; None: skip
    blend: dict[str, Any] | None = field(default_factory=dict)  # BlendReversal keyword overrides; None: skip
    strip_n: int = 100
    strip_calibration: int = 500  # clean held-out images that set STRIP's boundary (pool: the scan half)
    art: bool = True
    art_pool: int = 500  # clean images ART's mitigate() superimposes and calibrates on
    overhead_repeats: int = 200
    nc_speed_rounds: int = 20
    torchserve: bool = True
    ts_requests: int = 50
    ts_rounds: int = 10
    ts_concurrency: int = 4
    knn: bool = True  # the guard's nearest-neighbour feature check (build_profile(knn=...))
    flip_check: bool = True  # evaluate the opt-in mirror-consistency check next to the guard
    scaling: bool = True  # Neural Cleanse's scan seconds at 10, 100 and 1000 classes (composed glyphs)
    resnet18_performance: bool = True  # overhead and TorchServe throughput on a BadNets ResNet-18 layout model
    peers: bool = True  # IBD-PSC and SCALE-UP next to STRIP (guard.bench.peers)
    # the white-box attacker on the badnets and blended rows: (Adam steps, surrogate weight) per budget; None: skip
    whitebox_budgets: tuple[tuple[int, float], ...] | None = ((50, 0.3), (150, 1.0), (300, 3.0))
    # the gray-box attacker on every row whose trigger it can re-optimise (patch, blend key, warp field):
    # (Adam steps, moment-matching weight) per budget, and how many images of its own it draws; None: skip
    graybox_budgets: tuple[tuple[int, float], ...] | None = ((100, 1.0), (300, 1.0), (300, 3.0), (300, 10.0))
    graybox_images: int = 1500
    # purification with this many clean images per class (a fresh scan of each subset), every method of
    # guard.bench.purification.METHODS judged with the real trigger, and the comeback rows; None: skip
    purify_per_class: tuple[int, ...] | None = (20, 50)
    purify_methods: tuple[str, ...] = ("auto", "fine-pruning", "unlearn", "anp")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        d["nets"] = list(self.nets)
        d["purify_per_class"] = None if self.purify_per_class is None else list(self.purify_per_class)
        d["purify_methods"] = list(self.purify_methods)
        return d


PRESETS: dict[str, BenchConfig] = {
    # a sample of the attacks (one adaptive) on DemoNet, data and epochs at which they reach their floors
    "quick": BenchConfig(preset="quick", attacks=QUICK_ATTACKS, zoo=ZooConfig(n_train=4000, n_test=1000, epochs=5),
                         n_eval=400, nc_max_rounds=100, strip_calibration=250, art_pool=250, nc_speed_rounds=50,
                         dl_tnd={"iterations": 20, "search_steps": 3, "per_image_iterations": 20},
                         df_tnd={"iterations": 100}, purify_per_class=(20,)),
    "full": BenchConfig(preset="full", attacks=ALL_ATTACKS, zoo=ZooConfig(n_train=6000, n_test=2000, epochs=6),
                        nets=ALL_NETS, n_clean=2000, n_eval=1000, overhead_repeats=500, nc_speed_rounds=100,
                        ts_requests=100, ts_rounds=16),
    # the test suite's configuration: checks that the pipeline runs and fills every field, not quality
    "tiny": BenchConfig(preset="tiny", attacks=("badnets",), zoo=ZooConfig(n_train=400, n_test=200, epochs=1),
                        n_clean=120, n_eval=40, nc_max_rounds=3, strip_n=10, strip_calibration=60, art_pool=40,
                        dl_tnd={"samples_per_class": 3, "iterations": 2, "search_steps": 1, "per_image_iterations": 2},
                        df_tnd={"n_seeds": 2, "iterations": 3}, blend={"alphas": (0.1, 0.2), "steps": 2,
                                                                     "refine_steps": 1, "n_eval": 40},
                        overhead_repeats=10, nc_speed_rounds=1, scaling=False, resnet18_performance=False,
                        whitebox_budgets=((2, 0.3), (3, 1.0), (4, 3.0)), graybox_budgets=((2, 1.0), (3, 3.0)),
                        graybox_images=200, purify_per_class=(10,), purify_methods=("fine-pruning",),
                        torchserve=False, ts_requests=5, ts_rounds=2, ts_concurrency=2),
}


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "numpy": np.__version__,
            "load_average_1m_at_start": round(load[0], 2) if load else None}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker processes, not TorchServe's JVM).

    On a shared machine wall time says little; CPU seconds over the core count bound what the same
    run takes on an idle one."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)


def _threads(requested: int | None) -> tuple[int, str]:
    """Torch threads for the run: as requested, else 1 on a busy machine and all cores on an idle one.

    Measured here: with 2 threads on 2 cores shared with other work, OpenMP's spinning threads made a
    batch-32 forward 18x slower than with 1 thread, so a loaded machine runs single-threaded.
    """
    if requested:
        return int(requested), "--threads"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= 0.5 * cores:
        return 1, f"load average {load:.1f} on {cores} cores: 1 thread (oversubscribed OpenMP spins)"
    return cores, f"load average {load:.1f} on {cores} cores: idle enough for {cores} threads"


def _detected(flagged: list[int], target: int) -> bool:
    """An all-to-one attack is detected when its target is flagged; all-to-all (target -1) by any flag."""
    return bool(flagged) if target < 0 else target in flagged


def _offline(cfg: BenchConfig, model: nn.Module, summary: dict[str, Any], profile_meta: dict[str, Any],
             x_fit: np.ndarray, y_fit: np.ndarray, target: int, num_classes: int) -> dict[str, Any]:
    """Each offline method's verdict on one model."""
    nc_flag = list(summary["suspect_labels"])
    out: dict[str, Any] = {"neural_cleanse": {
        "detected": _detected(nc_flag, target), "flagged_labels": nc_flag,
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
        out[name] = {"detected": _detected(flagged, target), "flagged_labels": flagged,
                     "seconds": round(time.perf_counter() - t0, 2),
                     key: round(float(stat(est)[target]), digits) if target >= 0 else None}
    return out


def _guard_scores(guard: Guard, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(N, n_checks)`` scores and the verdict's suspect flags of the guard on ``x``."""
    s, flag = [], []
    for i in range(0, len(x), batch):
        res = guard.run(x[i:i + batch])
        s.append(res.scores)
        flag.append(res.verdict_codes != 0)
    return np.concatenate(s), np.concatenate(flag)


def _online(guard: Guard, cal_x: np.ndarray, neg: np.ndarray, pos: np.ndarray, fpr: float,
            success: np.ndarray, flip_check: bool = True) -> dict[str, Any]:
    """Per check and combined: AUROC, TPR at 1% FPR, and the deployed thresholds' realised TPR/FPR.

    ``success`` marks the triggered inputs on which the attack works on the bare model; the combined
    figures are also given on those alone (``combined_successful``), since an attack that fails
    needs no stopping and weak attacks otherwise dilute the positives.
    """
    cal_s, _ = _guard_scores(guard, cal_x)
    neg_s, neg_flag = _guard_scores(guard, neg)
    pos_s, pos_flag = _guard_scores(guard, pos)
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


def _repair(guard: Guard, neg: np.ndarray, y_neg: np.ndarray, pos: np.ndarray, pos_target: np.ndarray,
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


def _strip(cfg: BenchConfig, model: nn.Module, pool: np.ndarray, cal: np.ndarray, neg: np.ndarray,
           pos: np.ndarray) -> dict[str, Any]:
    st = Strip(n=cfg.strip_n, frr=cfg.fpr, seed=cfg.zoo.seed).fit(model, pool, cal)
    t0 = time.perf_counter()
    sn, sp = st.score(neg, seed_offset=2), st.score(pos, seed_offset=3)
    per_input_ms = (time.perf_counter() - t0) / (len(neg) + len(pos)) * 1e3
    return separation(sn, sp, fpr=cfg.fpr) | {
        "paper_threshold": at_threshold(sn > st.threshold_, sp > st.threshold_),
        "n": cfg.strip_n, "seconds_per_input_ms": round(per_input_ms, 3), "fit_seconds": round(st.seconds_, 2)}


def _art(cfg: BenchConfig, model: nn.Module, pool: np.ndarray, neg: np.ndarray, pos: np.ndarray,
         num_classes: int) -> dict[str, Any]:
    r = art_strip(model, pool, neg, pos, n=cfg.strip_n, far=cfg.fpr, seed=cfg.zoo.seed, num_classes=num_classes)
    return separation(r["neg_scores"], r["pos_scores"], fpr=cfg.fpr) | {
        "art_threshold": at_threshold(r["neg_flagged"], r["pos_flagged"]), "n": cfg.strip_n,
        "seconds": round(r["seconds"], 2), "statistic": "ART 1.x: sum over classes of the entropy across copies"}


def _whitebox(cfg: BenchConfig, model: nn.Module, attack: Attack, guard: Guard, d, n_eval: int, x_fit: np.ndarray,
              y_fit: np.ndarray) -> dict[str, Any]:
    """The white-box attacker against this row's guard: it optimises on test images past the evaluation
    ones (the scan's clean half where too few are left) and is measured on the row's triggered inputs."""
    from guard.bench.whitebox import bench_row

    own = attack.victims(d.y_test[n_eval:])
    x_att = d.x_test[n_eval:][own] if own.sum() >= 32 else x_fit[attack.victims(y_fit)]
    x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
    return bench_row(model, attack, guard, x_att[:500], x_eval, budgets=cfg.whitebox_budgets, seed=cfg.zoo.seed)


def _regraftable(attack: Attack | None, shape: tuple[int, int, int]) -> bool:
    """Whether the adaptive attackers can re-optimise ``attack``'s trigger (a patch, a blend key, a warp)."""
    from guard.bench.trigger_param import trigger_kind

    if attack is None or getattr(attack, "target", -1) < 0:
        return False
    try:
        trigger_kind(attack, shape)
    except ValueError:
        return False
    return True


def _attacker_images(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """The gray-box attacker's own images: a glyph draw disjoint from the zoo's and the defender's seeds."""
    return glyphs(cfg.graybox_images, seed=cfg.zoo.seed * 10 + 7)


def _graybox(cfg: BenchConfig, model: nn.Module, attack: Attack, guard: Guard, d, n_eval: int,
             x_cal: np.ndarray) -> dict[str, Any]:
    """The gray-box attacker against this row's model, judged by this row's guard on its triggered inputs,
    without and with the opt-in trigger memory (calibrated on the defender's clean ``x_cal``, holding the
    row's clean test images as earlier traffic; its false-positive rate on them is ``memory_clean_fpr``)."""
    from guard.bench.graybox import Budget, attack_model
    from guard.online.memory import TriggerMemory

    x_own, y_own = _attacker_images(cfg)
    x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
    memory = TriggerMemory(seed=cfg.zoo.seed).fit(x_cal).infer_threshold(x_cal, fpr=cfg.fpr)
    traffic = d.x_test[:n_eval]
    memory.update(x_cal)
    clean_fpr = float((memory.observe(traffic) > memory.threshold_).mean())
    out = attack_model(model, attack, guard, x_own, y_own, x_eval, seed=cfg.zoo.seed,
                       budgets=tuple(Budget(int(s), float(w)) for s, w in cfg.graybox_budgets),
                       memory=memory, traffic=traffic)
    return out | {"memory_clean_fpr": round(clean_fpr, 4), "memory_size": memory.size}


def _targets(row: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's bars for one attack row: value, bar and whether it is met (None: no bar)."""
    name, online, rep = row["name"], row["online"], row["repair"]
    comb = online["combined"]
    out: dict[str, Any] = {}
    if name == "badnets":
        out["combined_tpr_at_1pct_fpr>=0.95"] = comb["tpr_at_1pct_fpr"] >= 0.95
        out["combined_auroc>=0.99"] = comb["auroc"] >= 0.99
        out["repair_attack_success<=0.01"] = rep["attack_success_rate"] <= 0.01
        out["repair_clean_accuracy_loss<=1pt"] = rep["clean_accuracy_loss_points"] <= 1.0
    elif name in ("blended", "sig"):
        out["combined_auroc>=0.97"] = comb["auroc"] >= 0.97
    elif name in ("wanet", "input_aware"):
        out["combined_auroc>=0.90"] = comb["auroc"] >= 0.90
    _, peer_tpr = best_peer(row.get("peers") or {"strip": {"available": True, **row["strip"]}})
    if peer_tpr is not None:
        out["combined_tpr_at_1pct_fpr>=best_peer"] = comb["tpr_at_1pct_fpr"] >= peer_tpr
    wb = row.get("whitebox")
    if wb and wb.get("budgets"):
        out["whitebox_residual_attack_success<=0.25"] = wb["max_residual_attack_success"] <= 0.25
    gb = row.get("graybox")
    if gb and gb.get("budgets"):
        out["graybox_residual_attack_success<=0.25"] = gb["max_residual_attack_success"] <= 0.25
    pur = (row.get("purification") or {}).get("per_class") or {}
    for n, size in pur.items():
        auto = next((r for r in size["rows"] if r["method"] == "auto"), None)
        if auto is None:
            continue
        out[f"purify_auto_best_or_tied_{n}_per_class"] = size["auto_best_or_tied"]
        patch = name in ("badnets", "badnets_random", "adap_patch", "trojannn", "tact", "label_consistent")
        asr_bar, drop_bar = ((0.02, 1.0) if n == "50" else (0.05, 2.0)) if patch else (0.10, 2.0)
        out[f"purify_auto_attack_success<={asr_bar:g}_{n}_per_class"] = auto["ok"] and auto["real_asr_after"] <= asr_bar
        out[f"purify_auto_accuracy_drop<={drop_bar:g}pt_{n}_per_class"] = (
            auto["ok"] and auto["accuracy_drop_points"] <= drop_bar)
    return out


def _data(cfg: BenchConfig):
    d = zoo_data(seed=cfg.zoo.seed, n_train=cfg.zoo.n_train, n_test=cfg.zoo.n_test)
    xc, yc = glyphs(cfg.n_clean, seed=cfg.zoo.seed * 10 + 2)  # the demo world's clean.npz seed
    return d, xc, yc


def run_bench(cfg: BenchConfig, *, out_dir: Path, cache: Path | None = None, threads: int | None = None,
              progress: Callable[[str], None] | None = None, command: str = "",
              jobs: int | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the results (also the caller's to write).

    ``jobs`` worker processes (single-threaded) run the attacks side by side; by default two on an
    idle machine with two or more cores, else one (in this process). The performance figures are
    measured afterwards, in this process, with no job running.
    """
    previous_threads = torch.get_num_threads()
    threads, threads_reason = _threads(threads)
    if jobs is None:
        jobs = 2 if threads > 1 else 1
    torch.set_num_threads(threads)
    try:
        return _run(cfg, out_dir=out_dir, cache=cache, threads_reason=threads_reason, progress=progress,
                    command=command, jobs=max(1, int(jobs)))
    finally:
        torch.set_num_threads(previous_threads)


_DATA_MEMO: dict[tuple, tuple] = {}


def _data_memo(cfg: BenchConfig):
    """:func:`_data` once per process (a worker runs several attacks on the same data)."""
    key = (replace(cfg.zoo, net=""), cfg.n_clean)  # the same data for every network
    if key not in _DATA_MEMO:
        _DATA_MEMO[key] = _data(cfg)
    return _DATA_MEMO[key]


def _print_progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _attack_row(cfg: BenchConfig, name: str, cache: Path, profiles: Path, art_ok: bool,
                progress: Callable[[str], None] | None) -> tuple[dict[str, Any], str | None]:
    """Everything measured on one attack's model (on network ``cfg.zoo.net``); its profile is saved under
    ``profiles/NAME`` (DemoNet) or ``profiles/NET/NAME`` (another network).

    Returns the row and ART's error message if ART's STRIP failed on it.
    """
    t0 = time.perf_counter()
    d, xc, yc = _data_memo(cfg)
    x_fit, y_fit, x_cal, y_cal = split(xc, yc, 0.5, seed=cfg.zoo.seed)  # build_profile's own split
    n_eval = min(cfg.n_eval, len(d.x_test))
    neg, y_neg = d.x_test[:n_eval], d.y_test[:n_eval]
    clean = zoo_model("clean", cfg.zoo, data=d, cache=cache)
    net = cfg.zoo.net
    _log(progress, f"{name} ({net}): training")
    zm = zoo_model(name, cfg.zoo, data=d, cache=cache, clean_model=clean.model)
    k = num_classes(zm.model, xc)
    attack: Attack = zm.attack  # type: ignore[assignment]
    target = int(getattr(attack, "target", -1))
    _log(progress, f"{name}: scanning (Neural Cleanse, checks, calibration)")
    nc = NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False)
    t_scan = time.perf_counter()
    profile, summary = build_profile(zm.model, xc, yc, fpr=cfg.fpr, seed=cfg.zoo.seed, nc=nc, progress=False,
                                     knn=cfg.knn)
    scan_seconds = time.perf_counter() - t_scan
    profile.save(_profile_dir(profiles, net, name))
    _log(progress, f"{name}: DL-TND / DF-TND")
    detected = _offline(cfg, zm.model, summary, profile.meta, x_fit, y_fit, target, k)
    victims = attack.victims(d.y_test)
    pos = attack.stamp(d.x_test[victims][:n_eval])
    pos_target = attack.target_of(d.y_test[victims][:n_eval])
    _log(progress, f"{name}: online checks, repair")
    guard = Guard(zm.model, profile, mode="enforce", verify=False)
    with torch.inference_mode():
        success = zm.model(torch.from_numpy(pos)).argmax(1).numpy() == pos_target
    online = _online(guard, x_cal, neg, pos, cfg.fpr, success, cfg.flip_check)
    repair = _repair(Guard(zm.model, profile, mode="repair", verify=False), neg, y_neg, pos, pos_target, zm.model)
    _log(progress, f"{name}: STRIP (N={cfg.strip_n})")
    strip = _strip(cfg, zm.model, x_fit, x_cal[:cfg.strip_calibration], neg, pos)
    art, art_error = None, None
    if art_ok:
        _log(progress, f"{name}: ART STRIP")
        try:
            art = _art(cfg, zm.model, x_fit[:cfg.art_pool], neg, pos, k)
        except Exception as e:  # report ART's own failure instead of losing the run
            art_error = f"ART STRIP failed: {type(e).__name__}: {e}"
    peers = None
    if cfg.peers:
        _log(progress, f"{name}: IBD-PSC, SCALE-UP, TED, TED++")
        peers = peer_rows(zm.model, x_cal, y_cal, neg, pos, fpr=cfg.fpr, seed=cfg.zoo.seed, strip=strip)
    whitebox = None
    if cfg.whitebox_budgets and name in ("badnets", "blended"):
        _log(progress, f"{name}: white-box attacker ({len(cfg.whitebox_budgets)} budgets)")
        whitebox = _whitebox(cfg, zm.model, attack, guard, d, n_eval, x_fit, y_fit)
    graybox = None
    if cfg.graybox_budgets and _regraftable(attack, tuple(neg.shape[1:])):
        _log(progress, f"{name}: gray-box attacker ({len(cfg.graybox_budgets)} budgets)")
        graybox = _graybox(cfg, zm.model, attack, guard, d, n_eval, x_cal)
    purification = None
    if cfg.purify_per_class:
        from guard.bench.purification import purification_section

        _log(progress, f"{name}: purification ({', '.join(map(str, cfg.purify_per_class))} clean images per class)")
        def scan(model, x, y):  # the row's own scan settings, on the subset a user with that many images has
            return build_profile(model, x, y, fpr=cfg.fpr, seed=cfg.zoo.seed, progress=False, knn=cfg.knn,
                                 nc=NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False))[0]

        purification = purification_section(zm.model, attack, xc, yc, neg, y_neg, per_class=cfg.purify_per_class,
                                            methods=cfg.purify_methods, seed=cfg.zoo.seed, scan=scan)
    row = {"name": name, "net": net, "seed": cfg.zoo.seed, "target": target,
           "clean_accuracy": round(zm.clean_accuracy, 4),
           "attack_success_rate": round(float(zm.attack_success_rate or 0.0), 4),
           "train_seconds": round(zm.train_seconds, 1), "cached": zm.cached,
           "scan_seconds": round(scan_seconds, 2), "suspect_labels": summary["suspect_labels"],
           "detected": detected, "online": online, "repair": repair, "strip": strip, "art_strip": art,
           "peers": peers, "whitebox": whitebox, "graybox": graybox, "purification": purification,
           "n_eval": {"clean": int(len(neg)), "triggered": int(len(pos))},
           "seconds": round(time.perf_counter() - t0, 1)}
    row["targets"] = _targets(row)
    _log(progress, f"{name} ({net}): done in {row['seconds']:.0f}s")
    return row, art_error


def _profile_dir(profiles: Path, net: str, name: str) -> Path:
    """Where an attack's profile goes: ``profiles/NAME`` for DemoNet, ``profiles/NET/NAME`` otherwise."""
    return profiles / name if net == "demo_net" else profiles / net / name


def _on(cfg: BenchConfig, net: str) -> BenchConfig:
    """``cfg`` with its zoo trained on network ``net``."""
    return replace(cfg, zoo=replace(cfg.zoo, net=net))


def _job(args: tuple) -> tuple[dict[str, Any], str | None]:
    """One attack in a worker process: single-threaded torch and BLAS, so two jobs share two cores."""
    cfg, name, cache, profiles, art_ok, show = args
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _saved_row(cfg, name, cache, profiles, art_ok, _print_progress if show else None)


#: the packages whose code produces an attack row: a change to any of them recomputes saved rows
_ROW_CODE = ("guard/bench", "guard/online", "guard/scan", "guard/purify", "guard/demo", "guard/model.py",
             "guard/profile.py", "guard/stats.py", "guard/data.py")


def _row_key(cfg: BenchConfig, name: str) -> str:
    """A digest of the configuration, the attack and the source of every module that measures a row
    (the report's rendering left out, and the purification code when the run has no purification rows)."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    skip = {"guard/bench/report.py"}
    h = hashlib.sha256(json.dumps([cfg.to_json(), name], sort_keys=True).encode())
    for part in _ROW_CODE:
        if part == "guard/purify" and not cfg.purify_per_class:
            continue
        path = root / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            rel = f.relative_to(root).as_posix()
            if rel in skip or (rel == "guard/bench/purification.py" and not cfg.purify_per_class):
                continue
            h.update(rel.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _saved_row(cfg: BenchConfig, name: str, cache: Path, profiles: Path, art_ok: bool,
               progress: Callable[[str], None] | None) -> tuple[dict[str, Any], str | None]:
    """:func:`_attack_row`, saved as ``OUT/rows/NET-NAME-KEY.json`` when done and reused by a rerun with
    the same configuration and code (``KEY``, :func:`_row_key`): a long run that stops part-way (a
    machine taken back, a session over) resumes at the rows it had not finished. The row's profile is
    under ``profiles/`` beside it."""
    path = profiles.parent / "rows" / f"{cfg.zoo.net}-{name}-{_row_key(cfg, name)}.json"
    if path.exists():
        _log(progress, f"{name} ({cfg.zoo.net}): finished in an earlier run ({path.name})")
        saved = json.loads(path.read_text())
        return saved["row"] | {"resumed": True}, saved["art_error"]
    row, art_error = _attack_row(cfg, name, cache, profiles, art_ok, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"row": row, "art_error": art_error}))
    tmp.replace(path)
    return row, art_error


def _run(cfg: BenchConfig, *, out_dir: Path, cache: Path | None, threads_reason: str,
         progress: Callable[[str], None] | None, command: str, jobs: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache or out_dir / "models"
    profiles = out_dir / "profiles"
    art_ok, art_reason = art_available() if cfg.art else (False, "ART STRIP turned off (--no-art)")
    d, xc, yc = _data_memo(cfg)
    x_fit, y_fit, _, _ = split(xc, yc, 0.5, seed=cfg.zoo.seed)  # build_profile's own split
    neg = d.x_test[:min(cfg.n_eval, len(d.x_test))]

    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine() | {"threads_reason": threads_reason, "jobs": jobs}, "config": cfg.to_json(),
        "art_strip_available": art_ok, "art_strip_reason": None if art_ok else art_reason,
        "clean_models": [], "attacks": [],
    }
    cleans = {}
    for net in cfg.nets:
        _log(progress, f"training the clean {net} ({cfg.zoo.n_train} images, {cfg.zoo.epochs} epochs)")
        cleans[net] = zoo_model("clean", _on(cfg, net).zoo, data=d, cache=cache)  # cached: the jobs reuse it
    clean = cleans[cfg.nets[0]]
    k = num_classes(clean.model, xc)
    todo = [(_on(cfg, net), name, cache, profiles, art_ok, progress is not None)
            for net in cfg.nets for name in cfg.attacks]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        _log(progress, f"{len(todo)} attacks in {jobs} worker processes (1 thread each)")
        pool = mp.get_context("spawn").Pool(jobs)
        try:
            pending = pool.map_async(_job, todo, chunksize=1)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # beside the jobs: no spinning second thread
            try:
                for net in cfg.nets:
                    _clean_row(_on(cfg, net), cleans[net], xc, yc, x_fit, y_fit, k, results, progress)
            finally:
                torch.set_num_threads(threads)
            rows = pending.get()
        finally:
            pool.terminate()
            pool.join()
    else:
        for net in cfg.nets:
            _clean_row(_on(cfg, net), cleans[net], xc, yc, x_fit, y_fit, k, results, progress)
        rows = [_saved_row(*t[:5], progress) for t in todo]
    for row, art_error in rows:
        results["attacks"].append(row)
        if art_error:
            results["art_strip_reason"] = art_error
    ctx = None
    first = [r for r in results["attacks"] if r["net"] == cfg.nets[0]]  # performance: on the first network
    names = [r["name"] for r in first]
    if names:
        name = "badnets" if "badnets" in names else names[0]
        from guard.model import fingerprint
        from guard.profile import Profile

        zm = zoo_model(name, _on(cfg, cfg.nets[0]).zoo, data=d, cache=cache, clean_model=clean.model)
        row = first[names.index(name)]
        ctx = {"name": name, "net": cfg.nets[0], "model": zm.model, "target": row["target"],
               "profile": Profile.load(_profile_dir(profiles, cfg.nets[0], name), model_sha256=fingerprint(zm.model))}
    results["performance"] = _performance(cfg, ctx, results, xc, x_fit, neg, k, progress, cache=cache,
                                          profiles=profiles)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_1m_at_end"] = round(load[0], 2) if load else None
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["cpu_seconds"] = _cpu_seconds()
    results["targets"] = [{"scope": sc, "target": bar, "measured": meas, "met": met}
                          for sc, bar, meas, met in targets(results)]
    return results


def _clean_row(cfg: BenchConfig, clean, xc: np.ndarray, yc: np.ndarray, x_fit: np.ndarray, y_fit: np.ndarray,
               k: int, results: dict[str, Any], progress: Callable[[str], None] | None) -> None:
    """The clean model through every offline method: what each flags is a false positive."""
    nc = NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False)
    _log(progress, "scanning the clean model")
    cprofile, csum = build_profile(clean.model, xc, yc, fpr=cfg.fpr, seed=cfg.zoo.seed, nc=nc, progress=False,
                                   knn=cfg.knn)
    cmeta = {"scan": {"seconds": csum["seconds"], "steps": nc.steps_}}
    coff = _offline(cfg, clean.model, csum, cmeta, x_fit, y_fit, -1, k)
    for v in coff.values():
        if v is not None:
            v["false_positive"] = v.pop("detected")
    floors = _graybox_floors(cfg, clean.model, cprofile, progress)
    results["clean_models"].append({"name": "clean", "net": cfg.zoo.net, "seed": cfg.zoo.seed,
                                    "clean_accuracy": round(clean.clean_accuracy, 4),
                                    "train_seconds": round(clean.train_seconds, 1), "cached": clean.cached,
                                    "detected": coff, "graybox_floor": floors})


def _graybox_floors(cfg: BenchConfig, model: nn.Module, profile, progress) -> dict[str, Any] | None:
    """The gray-box attacker's strongest budget against the *clean* model guarded by its own profile, per
    attack: how often the re-optimised trigger hijacks a model that has no backdoor and passes its guard.

    A blend key or a warp field optimised at the attack's own strength is a universal adversarial
    perturbation as much as a trigger; this is the part of a row's residual that no backdoor is needed
    for, the floor to read that residual against."""
    if not cfg.graybox_budgets:
        return None
    from guard.bench.graybox import Budget, attack_model
    from guard.demo.attacks import ATTACKS

    d, _, _ = _data_memo(cfg)
    n_eval = min(cfg.n_eval, len(d.x_test))
    guard = Guard(model, profile, mode="enforce", verify=False)
    strongest = Budget(*max(cfg.graybox_budgets, key=lambda b: (b[0], b[1])))
    out: dict[str, Any] = {"budget": {"steps": strongest.steps, "weight": strongest.weight}, "attacks": {}}
    for name in cfg.attacks:
        attack = ATTACKS[name](seed=cfg.zoo.seed)
        if not _regraftable(attack, tuple(d.x_test.shape[1:])):
            continue
        _log(progress, f"gray-box floor: {name} against the clean {cfg.zoo.net}")
        x_own, y_own = _attacker_images(cfg)
        x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
        r = attack_model(model, attack, guard, x_own, y_own, x_eval, budgets=(strongest,), seed=cfg.zoo.seed)
        b = r["budgets"][0]
        out["attacks"][name] = {k: b[k] for k in ("attack_success_bare", "residual_attack_success", "rejection_rate")}
    return out





def _performance(cfg: BenchConfig, ctx: dict[str, Any] | None, results: dict[str, Any], xc: np.ndarray,
                 x_fit: np.ndarray, neg: np.ndarray, k: int, progress, *, cache: Path | None = None,
                 profiles: Path | None = None) -> dict[str, Any]:
    from guard.bench.nc_speed import nc_speedup, scan_seconds_by_classes
    from guard.bench.overhead import measure_overhead, overhead_breakdown

    perf: dict[str, Any] = {"model": None, "guard_overhead_p50_ratio": None, "guard_overhead_p95_ratio": None,
                            "nc_batched_speedup": None, "scan_seconds": None, "torchserve_throughput_ratio": None,
                            "ingress_throughput_ratio": None}
    scans = [r["scan_seconds"] for r in results["attacks"]]
    # the profile scan (Neural Cleanse + suspect neurons + fitting and calibrating the checks), median
    # over the attacks' models; the other offline methods' times next to it
    perf["scan_seconds"] = round(float(np.median(scans)), 2) if scans else None
    perf["scan"] = {"profile_median": perf["scan_seconds"],
                    "per_attack": {(r["name"] if r["net"] == "demo_net" else f"{r['name']} ({r['net']})"):
                                   r["scan_seconds"] for r in results["attacks"]},
                    "dl_tnd_median": _median_of(results, "dl_tnd"), "df_tnd_median": _median_of(results, "df_tnd")}
    if cfg.scaling and cache is not None:
        _log(progress, "performance: Neural Cleanse at 10, 100 and 1000 classes (composed glyphs)")
        perf["scan_scaling"] = scan_seconds_by_classes(cache / "scaling", seed=cfg.zoo.seed)
        perf["scan_seconds_by_classes"] = perf["scan_scaling"]["scan_seconds_by_classes"]
    if cfg.resnet18_performance and cache is not None and profiles is not None:
        _log(progress, "performance: the guard on a BadNets ResNet-18 layout model")
        perf["resnet18"] = _resnet18_performance(cfg, neg, cache, profiles)
    if ctx is None:
        return perf
    model, profile = ctx["model"], ctx["profile"]
    perf["model"] = ctx["name"]
    perf["net"] = ctx["net"]
    guard = Guard(model, profile, mode="enforce", verify=False)
    _log(progress, "performance: guard overhead (batch 1, 32)")
    over = {}
    for b in (1, 32):
        over[f"batch_{b}"] = measure_overhead(model, guard, neg, batch_size=b, repeats=cfg.overhead_repeats)
    perf["overhead"] = over
    perf["overhead_breakdown_batch_1_us"] = overhead_breakdown(guard, neg, repeats=cfg.overhead_repeats)
    if cfg.flip_check:
        from guard.bench.mirror import flip_cost

        perf["flip_check_cost_batch_1"] = flip_cost(model, neg, repeats=cfg.overhead_repeats)
    perf["guard_overhead_p50_ratio"] = {b: round(v["p50_ratio"], 3) for b, v in over.items()}
    perf["guard_overhead_p95_ratio"] = {b: round(v["p95_ratio"], 3) for b, v in over.items()}
    perf["checks"] = list(guard.names)
    _log(progress, f"performance: batched Neural Cleanse vs per-label loop ({cfg.nc_speed_rounds} rounds)")
    nc = nc_speedup(model, x_fit, num_classes=k, rounds=cfg.nc_speed_rounds, seed=cfg.zoo.seed, target=ctx["target"])
    perf["nc_batched_speedup"] = nc["nc_batched_speedup"]
    perf["nc_batched"] = nc
    if not cfg.torchserve:
        perf["torchserve"] = {"skipped": "TorchServe throughput not measured in this configuration"}
        return perf
    _log(progress, "performance: TorchServe throughput, guarded vs baseline handler")
    perf["torchserve"] = _torchserve(_on(cfg, ctx["net"]), model, profile, neg)
    perf["torchserve_throughput_ratio"] = perf["torchserve"].get("torchserve_throughput_ratio")
    perf["ingress_throughput_ratio"] = perf["torchserve"].get("ingress_throughput_ratio")
    return perf


def _resnet18_performance(cfg: BenchConfig, neg: np.ndarray, cache: Path, profiles: Path) -> dict[str, Any]:
    """Overhead (batch 1 and 32) and TorchServe throughput on the zoo's BadNets ResNet-18 layout model, with
    the profile this run wrote for it (the full preset) or a default scan of it (the others)."""
    from guard.bench.overhead import net_performance
    from guard.demo.attacks.zoo import model_file
    from guard.model import fingerprint
    from guard.profile import Profile

    d, xc, yc = _data_memo(cfg)
    zm = zoo_model("badnets", replace(cfg.zoo, net="resnet18"), data=d, cache=cache)
    path = _profile_dir(profiles, "resnet18", "badnets")
    if (path / "profile.json").is_file():
        profile = Profile.load(path, model_sha256=fingerprint(zm.model))
    else:
        nc = NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False)
        profile, _ = build_profile(zm.model, xc, yc, fpr=cfg.fpr, seed=cfg.zoo.seed, nc=nc, progress=False,
                                   knn=cfg.knn)
    ts = None
    if cfg.torchserve and (shutil.which("java") is not None or os.environ.get("JAVA_HOME")):
        ts = {"requests": cfg.ts_requests, "rounds": cfg.ts_rounds, "concurrency": cfg.ts_concurrency,
              "threads": torch.get_num_threads()}
    out = net_performance(zm.model, profile, neg, model_file("resnet18"), repeats=cfg.overhead_repeats,
                          torchserve=ts)
    if cfg.torchserve and ts is None:
        out["torchserve"] = {"error": "java not found: TorchServe needs Java 17"}
    return {"model": "badnets", "net": "resnet18", "clean_accuracy": round(zm.clean_accuracy, 4),
            "attack_success_rate": zm.attack_success_rate, "suspect_labels": profile.suspect_labels} | out


def _median_of(results: dict[str, Any], method: str) -> float | None:
    v = [r["detected"][method]["seconds"] for r in results["attacks"] if r["detected"].get(method)]
    return round(float(np.median(v)), 2) if v else None


def _torchserve(cfg: BenchConfig, model: nn.Module, profile, x: np.ndarray) -> dict[str, Any]:
    """Write the model as a user would (model file, state_dict, profile) and measure both handlers."""
    from guard.bench.serving import torchserve_throughput
    from guard.demo.attacks.zoo import model_file
    from guard.errors import GuardError
    from guard.torchserve.server import ServeError

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return {"error": "java not found: TorchServe needs Java 17"}
    work = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    try:
        (work / "model.py").write_text(model_file(cfg.zoo.net))
        torch.save(model.state_dict(), work / "weights.pt")
        prof_dir = profile.save(work / "profile")
        return torchserve_throughput(work / "model.py", work / "weights.pt", prof_dir, x, requests=cfg.ts_requests,
                                     rounds=cfg.ts_rounds, concurrency=cfg.ts_concurrency, work_dir=work / "ts",
                                     threads=torch.get_num_threads())
    except (GuardError, ServeError, OSError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def preset(name: str, **overrides: Any) -> BenchConfig:
    """A preset with some fields replaced (``attacks``, ``zoo``, ``torchserve``, ...)."""
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
