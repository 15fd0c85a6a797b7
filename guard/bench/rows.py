"""A run's rows: everything measured on one attack's model, the clean model's false positives, and the
bars each row is judged by."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.bench.attackers import (
    after_purification,
    graybox_floors,
    graybox_row,
    memory_watches,
    regraftable,
    stream_clean,
    whitebox_row,
    worst_after_purification,
)
from guard.bench.config import BenchConfig, bench_data, log, profile_dir
from guard.bench.detection import art_figures, offline_verdicts, online_figures, repair_figures, strip_figures
from guard.bench.models import zoo_model
from guard.bench.peers.evaluate import best_peer, peer_rows
from guard.data import split
from guard.demo.attacks import Attack
from guard.model import num_classes
from guard.online import Guard
from guard.purify.purify import rescan_watch
from guard.scan import build_profile
from guard.scan.neural_cleanse import NeuralCleanse


def run_scan(cfg: BenchConfig, model, x: np.ndarray, y: np.ndarray, *, trajectory: bool | None = None,
             watch: list[int] | tuple[int, ...] = ()) -> tuple[Any, dict[str, Any], NeuralCleanse]:
    """``build_profile`` with the run's scan settings (its FPR, seed, Neural Cleanse rounds, k-NN check and,
    unless ``trajectory`` says otherwise, trajectory check; the memory also on the labels in ``watch``): the
    profile, its summary and the Neural Cleanse scan that made it."""
    nc = NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False)
    profile, summary = build_profile(model, x, y, fpr=cfg.fpr, seed=cfg.zoo.seed, nc=nc, progress=False,
                                     knn=cfg.knn, trajectory=cfg.trajectory if trajectory is None else trajectory,
                                     watch=watch)
    return profile, summary, nc


def attack_row(cfg: BenchConfig, name: str, cache: Path, profiles: Path, art_ok: bool,
                progress: Callable[[str], None] | None) -> tuple[dict[str, Any], str | None]:
    """Everything measured on one attack's model (on network ``cfg.zoo.net``); its profile is saved under
    ``profiles/NAME`` (DemoNet) or ``profiles/NET/NAME`` (another network).

    Returns the row and ART's error message if ART's STRIP failed on it.
    """
    t0 = time.perf_counter()
    d, xc, yc = bench_data(cfg)
    x_fit, y_fit, x_cal, y_cal = split(xc, yc, 0.5, seed=cfg.zoo.seed)  # build_profile's own split
    n_eval = min(cfg.n_eval, len(d.x_test))
    neg, y_neg = d.x_test[:n_eval], d.y_test[:n_eval]
    clean = zoo_model("clean", cfg.zoo, data=d, cache=cache)
    net = cfg.zoo.net
    log(progress, f"{name} ({net}): training")
    zm = zoo_model(name, cfg.zoo, data=d, cache=cache, clean_model=clean.model)
    k = num_classes(zm.model, xc)
    attack: Attack = zm.attack  # type: ignore[assignment]
    target = int(getattr(attack, "target", -1))
    log(progress, f"{name}: scanning (Neural Cleanse, checks, calibration)")
    t_scan = time.perf_counter()
    profile, summary, _ = run_scan(cfg, zm.model, xc, yc)
    scan_seconds = time.perf_counter() - t_scan
    profile.save(profile_dir(profiles, net, name))
    log(progress, f"{name}: DL-TND / DF-TND")
    detected = offline_verdicts(cfg, zm.model, summary, profile.meta, x_fit, y_fit, target, k)
    victims = attack.victims(d.y_test)
    pos = attack.stamp(d.x_test[victims][:n_eval])
    pos_target = attack.target_of(d.y_test[victims][:n_eval])
    log(progress, f"{name}: online checks, repair")
    guard = Guard(zm.model, profile, mode="enforce", verify=False, memory=False)  # per input: stateless
    with torch.inference_mode():
        success = zm.model(torch.from_numpy(pos)).argmax(1).numpy() == pos_target
    online = online_figures(guard, x_cal, neg, pos, cfg.fpr, success, cfg.flip_check)
    repair = repair_figures(Guard(zm.model, profile, mode="repair", verify=False, memory=False), neg, y_neg, pos,
                            pos_target, zm.model)
    clean_stream = stream_clean(d, attack, n_eval)
    stream = stream_row(zm.model, profile, pos, pos_target, clean_stream, x_cal)
    log(progress, f"{name}: STRIP (N={cfg.strip_n})")
    strip = strip_figures(cfg, zm.model, x_fit, x_cal[:cfg.strip_calibration], neg, pos)
    art, art_error = None, None
    if art_ok:
        log(progress, f"{name}: ART STRIP")
        try:
            art = art_figures(cfg, zm.model, x_fit[:cfg.art_pool], neg, pos, k)
        except Exception as e:  # report ART's own failure instead of losing the run
            art_error = f"ART STRIP failed: {type(e).__name__}: {e}"
    peers = None
    if cfg.peers:
        log(progress, f"{name}: IBD-PSC, SCALE-UP, TED, TED++")
        peers = peer_rows(zm.model, x_cal, y_cal, neg, pos, fpr=cfg.fpr, seed=cfg.zoo.seed, strip=strip)
    whitebox = None
    if cfg.whitebox_budgets and name in ("badnets", "blended"):
        log(progress, f"{name}: white-box attacker ({len(cfg.whitebox_budgets)} budgets)")
        whitebox = whitebox_row(cfg, zm.model, attack, guard, d, n_eval, x_fit, y_fit, x_cal)
    graybox, stamped = None, None
    if cfg.graybox_budgets and regraftable(attack, tuple(neg.shape[1:])):
        log(progress, f"{name}: gray-box attacker ({len(cfg.graybox_budgets)} budgets)")
        graybox = graybox_row(cfg, zm.model, attack, guard, d, n_eval, x_cal, keep_stamped=bool(cfg.purify_per_class))
        stamped = graybox.pop("stamped", None)
    purification = None
    # the purified model the gray-box keys are judged against: auto's (else the first method's) with the fewest images
    kept: dict[str, Any] = {}
    keep = ((min(cfg.purify_per_class), "auto" if "auto" in cfg.purify_methods else cfg.purify_methods[0])
            if cfg.purify_per_class and cfg.purify_methods else None)

    def on_fit(n: int, method: str, est) -> None:
        if (n, method) == keep:
            kept["est"] = est

    if cfg.purify_per_class:
        from guard.bench.purification import purification_section

        log(progress, f"{name}: purification ({', '.join(map(str, cfg.purify_per_class))} clean images per class)")
        def scan(model, x, y):  # the row's own scan settings, on the subset a user with that many images has
            return run_scan(cfg, model, x, y, trajectory=False)[0]

        purification = purification_section(zm.model, attack, xc, yc, neg, y_neg, per_class=cfg.purify_per_class,
                                            methods=cfg.purify_methods, seed=cfg.zoo.seed, scan=scan, on_fit=on_fit)
    if graybox is not None and stamped and kept.get("est") is not None:
        est = kept["est"]
        after = {"per_class": keep[0], "method": keep[1], "chosen": getattr(est, "chosen_", None), "ok": est.ok_}
        if est.ok_:  # rescanned on the row's clean images with the row's settings, as its own profile was, the
            # memory kept on what the row's profile and the purification's evidence suspected (guard scan --watch)
            log(progress, f"{name}: gray-box keys against the purified model")
            watch = rescan_watch(profile, (s for s, _ in est.scoring_))
            rescan = run_scan(cfg, est.model_, xc, yc, watch=watch)[0]
            after |= after_purification(est.model_, rescan, target, graybox["budgets"], stamped, history=x_cal,
                                        clean=clean_stream)
        graybox["after_purification"] = after
    row = {"name": name, "net": net, "seed": cfg.zoo.seed, "target": target,
           "clean_accuracy": round(zm.clean_accuracy, 4),
           "attack_success_rate": round(float(zm.attack_success_rate or 0.0), 4),
           "train_seconds": round(zm.train_seconds, 1), "cached": zm.cached,
           "scan_seconds": round(scan_seconds, 2), "suspect_labels": summary["suspect_labels"],
           "detected": detected, "online": online, "repair": repair, "stream": stream, "strip": strip, "art_strip": art,
           "peers": peers, "whitebox": whitebox, "graybox": graybox, "purification": purification,
           "n_eval": {"clean": int(len(neg)), "triggered": int(len(pos))},
           "seconds": round(time.perf_counter() - t0, 1)}
    row["targets"] = row_targets(row)
    log(progress, f"{name} ({net}): done in {row['seconds']:.0f}s")
    return row, art_error


def stream_row(model, profile, pos: np.ndarray, pos_target: np.ndarray, neg: np.ndarray, x_cal: np.ndarray
               ) -> dict[str, Any]:
    """The row's triggered inputs among the clean test images ``neg`` (:mod:`guard.bench.stream`), through the
    default guard (with the profile's trigger memory, if the scan added one) and through the same guard without
    the memory."""
    from guard.bench.stream import stream_figures

    out: dict[str, Any] = {"memory_watches": memory_watches(profile),
                           "memory_fpr": None if profile.memory is None else profile.memory["fpr"]}
    for key, memory in (("default", None), ("without_memory", False)):
        guard = Guard(model, profile, mode="enforce", verify=False, memory=memory)
        out[key] = stream_figures(guard, pos, pos_target, neg, x_cal)
    return out


def clean_row(cfg: BenchConfig, clean, xc: np.ndarray, yc: np.ndarray, x_fit: np.ndarray, y_fit: np.ndarray,
               k: int, results: dict[str, Any], progress: Callable[[str], None] | None) -> None:
    """The clean model through every offline method: what each flags is a false positive."""
    log(progress, "scanning the clean model")
    cprofile, csum, nc = run_scan(cfg, clean.model, xc, yc)
    cmeta = {"scan": {"seconds": csum["seconds"], "steps": nc.steps_}}
    coff = offline_verdicts(cfg, clean.model, csum, cmeta, x_fit, y_fit, -1, k)
    for v in coff.values():
        if v is not None:
            v["false_positive"] = v.pop("detected")
    floors = graybox_floors(cfg, clean.model, cprofile, progress)
    results["clean_models"].append({"name": "clean", "net": cfg.zoo.net, "seed": cfg.zoo.seed,
                                    "clean_accuracy": round(clean.clean_accuracy, 4),
                                    "train_seconds": round(clean.train_seconds, 1), "cached": clean.cached,
                                    "detected": coff, "graybox_floor": floors})


def row_targets(row: dict[str, Any]) -> dict[str, Any]:
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
    for kind in ("whitebox", "graybox"):  # through the per-input checks, and through the default guard (memory on)
        section = row.get(kind)
        if section and section.get("budgets"):
            out[f"{kind}_residual_attack_success<=0.25"] = section["max_residual_attack_success"] <= 0.25
            if section.get("max_residual_attack_success_with_memory") is not None:
                out[f"{kind}_residual_attack_success_with_memory<=0.25"] = (
                    section["max_residual_attack_success_with_memory"] <= 0.25)
    after = (row.get("graybox") or {}).get("after_purification") or {}
    if after.get("budgets"):  # the same keys against the purified model and its fresh scan (memory on where it has one)
        out["graybox_residual_attack_success_after_purification<=0.25"] = worst_after_purification(after) <= 0.25
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
