"""Batched all-label Neural Cleanse against the per-label loop, at equal steps and equal result quality.

:class:`~guard.scan.NeuralCleanse` optimises every label's trigger as rows of one problem: each step
stamps K triggers on one batch and runs one forward/backward over K x 32 images. The textbook way
runs ``NeuralCleanse(labels=[k])`` once per label. Both here run exactly ``rounds`` rounds (early
stopping off, so neither stops sooner) with the same hyperparameters, and both results are reported:
the per-label L1 norms, the anomaly index of the attack's target and the labels each flags, so a
speedup bought with worse triggers would show.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from guard.scan import NeuralCleanse
from guard.stats import anomaly_index, log_anomaly_index


def nc_speedup(model: nn.Module, x: np.ndarray, *, num_classes: int, rounds: int, seed: int = 0,
               target: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Time the batched scan and the per-label loop for ``rounds`` rounds each on ``device``; return both
    results. On a GPU a short untimed batched run first pays the one-off start-up (kernels, allocator)."""
    kw = dict(max_rounds=rounds, early_stop_patience=rounds + 1, seed=seed, progress=False, device=device)
    if device != "cpu":
        NeuralCleanse(**(kw | {"max_rounds": 2})).fit(model, x, num_classes=num_classes)
        NeuralCleanse(labels=[0], **(kw | {"max_rounds": 2})).fit(model, x, num_classes=num_classes)
    t0 = time.perf_counter()
    batched = NeuralCleanse(**kw).fit(model, x, num_classes=num_classes)
    t_batched = time.perf_counter() - t0
    loop_l1, loop_success = [], []
    t0 = time.perf_counter()
    for k in range(num_classes):
        one = NeuralCleanse(labels=[k], **kw).fit(model, x, num_classes=num_classes)
        loop_l1.append(float(one.l1_norms_[0]))
        loop_success.append(float(one.attack_success_[0]))
    t_loop = time.perf_counter() - t0
    loop_l1_arr = np.array(loop_l1)

    def quality(l1: np.ndarray) -> dict[str, Any]:
        ai, lai = anomaly_index(l1), log_anomaly_index(l1)
        below = l1 < np.median(l1)
        flagged = [int(i) for i in np.flatnonzero(below & ((ai > 2) | (lai > 2)))]
        out: dict[str, Any] = {"l1_norms": [round(float(v), 3) for v in l1], "flagged_labels": flagged}
        if target is not None and target >= 0:
            out["target_anomaly_index"] = round(float(ai[target]), 3)
            out["target_log_anomaly_index"] = round(float(lai[target]), 3)
        return out

    return {
        "nc_batched_speedup": round(t_loop / max(t_batched, 1e-9), 3),
        "labels": num_classes, "rounds": rounds, "steps_per_label": batched.steps_, "device": device,
        "batched_seconds": round(t_batched, 3), "per_label_loop_seconds": round(t_loop, 3),
        "batched": quality(batched.l1_norms_) | {"attack_success": [round(float(v), 3)
                                                                     for v in batched.attack_success_]},
        "per_label_loop": quality(loop_l1_arr) | {"attack_success": [round(v, 3) for v in loop_success]},
    }


SCALING_CLASSES = (10, 100, 1000)


def scaling_world(out_dir: Path, classes: int, *, backdoored: bool, seed: int = 0, n_train: int = 4000,
                  epochs: int = 4, n_clean: int = 1000) -> Any:
    """The composed-glyph world of ``classes`` classes (:mod:`guard.demo.nets.composed`, BadNets to label 6
    or a clean twin), built in ``out_dir`` or reused from there when its ``world.json`` is present."""
    from guard.demo.world import build, built

    out = Path(out_dir)
    done = built(out)
    if done is not None:
        return done
    return build(out, net="composed", classes=classes, backdoored=backdoored, seed=seed, n_train=n_train,
                 n_clean=n_clean, n_holdout=500, epochs=epochs, lr=4e-3)


def scan_seconds_by_classes(work_dir: Path, *, classes: tuple[int, ...] = SCALING_CLASSES, seed: int = 0,
                            n_train: int = 4000, epochs: int = 4, n_clean: int = 1000,
                            clean_twins_above: int = 10, **nc: Any) -> dict[str, Any]:
    """Neural Cleanse's default scan of the same net and input size at each class count, timed.

    The net is :class:`ComposedNet` (3x32x32 composed glyphs, 10 / 100 / 1000 classes from one model file,
    BadNets 3x3 patch to label 6); its models (and, above ``clean_twins_above`` classes, a clean twin each)
    are trained once in ``work_dir`` and reused. Each scan runs on half the clean images (the profile
    scan's share) with ``NeuralCleanse(**nc)`` (the defaults unless given); the result says whether the
    target was flagged and whether the clean twin was flagged at all (a false alarm), next to the seconds.
    """
    from guard.data import load_npz, split
    from guard.demo.world import DEMO_TARGET
    from guard.model import load_model

    seconds: dict[str, float] = {}
    detail: dict[str, Any] = {}
    for k in classes:
        row: dict[str, Any] = {}
        twins = [("backdoored", True)] + ([("clean", False)] if k > clean_twins_above else [])
        for kind, bd in twins:
            w = scaling_world(Path(work_dir) / f"composed-{k}-{kind}-seed{seed}", k, backdoored=bd, seed=seed,
                              n_train=n_train, epochs=epochs, n_clean=n_clean)
            model = load_model(w.model_file, w.weights)
            x, y = load_npz(w.clean)
            x_fit, _, _, _ = split(x, y, 0.5, seed=seed)
            scan = NeuralCleanse(**({"seed": seed, "progress": False} | nc))
            t0 = time.perf_counter()
            scan.fit(model, x_fit, num_classes=k)
            took = time.perf_counter() - t0
            index = np.maximum(scan.anomaly_index_, scan.log_anomaly_index_)  # what the flag rule reads
            top = [int(i) for i in np.argsort(-index, kind="stable")[:3]]
            row[kind] = {"seconds": round(took, 2), "suspect_labels": scan.suspect_labels_,
                         "clean_accuracy": round(float(w.clean_accuracy), 4),
                         "labels_optimised": len(scan.labels_), "steps": int(scan.steps_),
                         "threshold": round(float(scan.threshold_), 3),
                         "candidates": (scan.screened_ or {}).get("candidates"),
                         "max_anomaly_index": {str(scan.labels_[i]): round(float(index[i]), 2) for i in top},
                         "isolation": {str(scan.labels_[i]): _rounded(scan.isolation_[i]) for i in top}}
            if scan.screened_ is not None:
                order = list(scan.screened_["scores"])  # the 20 best screening scores, best first
                row[kind]["target_screening_rank"] = (order.index(str(DEMO_TARGET)) + 1
                                                      if str(DEMO_TARGET) in order else None)
            if bd:
                seconds[str(k)] = round(took, 2)
                row[kind]["attack_success"] = round(float(w.attack_success), 4)
                row[kind]["target"] = DEMO_TARGET
                row[kind]["target_found"] = DEMO_TARGET in scan.suspect_labels_
            else:
                row[kind]["false_alarm"] = bool(scan.suspect_labels_)
        detail[str(k)] = row
    lo, hi = str(min(classes)), str(max(classes))
    ratio = round(seconds[hi] / max(seconds[lo], 1e-9), 3) if lo != hi else None
    return {"scan_seconds_by_classes": seconds, "ratio_max_over_min_classes": ratio, "by_classes": detail,
            "net": "composed", "input_shape": [3, 32, 32]}


def _rounded(v: float) -> float | None:
    return round(float(v), 3) if np.isfinite(v) else None


def screening_rates(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Over seeds (``rows``: seed -> one class count's ``by_classes`` row of :func:`scan_seconds_by_classes`):
    the share of backdoored models whose scan flagged the target and nothing else, of clean twins with no
    label flagged, and of seeds right on both sides."""
    n = len(rows)
    if not n:
        raise ValueError("no seeds to rate")
    target_only = [r["backdoored"]["suspect_labels"] == [r["backdoored"]["target"]] for r in rows.values()]
    quiet = [not r["clean"]["suspect_labels"] for r in rows.values()]
    return {"seeds": n, "target_flagged_alone": round(sum(target_only) / n, 3),
            "clean_twin_quiet": round(sum(quiet) / n, 3),
            "right_on_both_sides": round(sum(a and b for a, b in zip(target_only, quiet)) / n, 3)}


def screening_over_seeds(work_dir: Path, *, classes: int, seeds: tuple[int, ...], **kw: Any) -> dict[str, Any]:
    """The default scan of the composed-glyph world of ``classes`` classes and of its clean twin for each
    seed (:func:`scan_seconds_by_classes`; worlds built once in ``work_dir`` and reused), and the rates of
    :func:`screening_rates`: a screening that holds on one seed may not on the next, so the bench reports
    the rate over seeds rather than one run."""
    rows = {str(seed): scan_seconds_by_classes(work_dir, classes=(classes,), seed=seed, clean_twins_above=0,
                                               **kw)["by_classes"][str(classes)] for seed in seeds}
    return {"classes": classes, "by_seed": rows} | screening_rates(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m guard.bench.nc_speed [--device cuda]``: the measurement on the demo model, as JSON.

    Builds the seeded demo world in a temporary directory (a minute on two cores) and times the batched
    scan against the per-label loop on ``--device``; for a GPU machine, where batching the labels into
    one large forward/backward is what the design is for.
    """
    import argparse
    import json
    import tempfile

    import torch

    from guard.data import load_npz
    from guard.demo.world import DEMO_TARGET, build
    from guard.model import load_model

    p = argparse.ArgumentParser(prog="python -m guard.bench.nc_speed", description=main.__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=50,
                   help="rounds for each scan (steps = 2 x rounds; 50 as in guard bench --quick)")
    p.add_argument("--samples", type=int, default=1000, help="clean images the scans draw batches from")
    p.add_argument("--over-seeds", metavar="A-B", default=None,
                   help="instead: the default scan of the composed-glyph world of --classes classes and of its "
                        "clean twin for seeds A to B, with the rate of right verdicts (minutes per seed)")
    p.add_argument("--classes", type=int, default=100, help="class count for --over-seeds")
    p.add_argument("--work", default=None, help="where --over-seeds builds and keeps its worlds")
    args = p.parse_args(argv)
    if args.over_seeds is not None:
        lo, _, hi = args.over_seeds.partition("-")
        seeds = tuple(range(int(lo), int(hi or lo) + 1))
        work = Path(args.work or tempfile.mkdtemp(prefix="guard-screening-"))
        print(json.dumps(screening_over_seeds(work, classes=args.classes, seeds=seeds, device=args.device),
                         indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="guard-nc-speed-") as tmp:
        world = build(tmp)
        model = load_model(world.model_file, world.weights)
        x, _ = load_npz(world.clean)
    out = nc_speedup(model, x[: args.samples], num_classes=10, rounds=args.rounds, target=DEMO_TARGET,
                     device=args.device)
    out["torch"] = torch.__version__
    out["device_name"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
