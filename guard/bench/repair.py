"""Repair benchmark: each repair method on a backdoored model with a few clean images per class,
judged with the attacker's *real* trigger (which the repair never sees) and the clean accuracy on
test images it never sees.

:func:`repair_rows` is the entry point: given a model, its attack, a clean pool and test data, it
draws ``per_class`` clean images per class (seeded), scans them as ``guard scan`` would (unless a
profile is given), runs every method through :func:`guard.repair.run.repair_model` with the same
accuracy bound, and returns one row per method. ``python -m guard.bench.repair`` prints the rows for
the demo worlds (DemoNet BadNets, DemoNet Blended, GapNet BadNets).
"""

from __future__ import annotations

import time

import numpy as np
from torch import nn

from guard.demo.train import attack_success
from guard.model import accuracy

METHODS = ("fine-pruning", "unlearn", "anp", "combined")


def per_class_subset(x: np.ndarray, y: np.ndarray, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of each class (fewer where a class has fewer), seeded."""
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]))
    return x[idx], y[idx]


def repair_rows(model: nn.Module, attack, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                profile=None, methods=METHODS, per_class: int = 20, max_drop: float = 0.02, seed: int = 0,
                world: str = "", progress: bool | None = False) -> list[dict]:
    """One row per method: the real trigger's attack success and the clean accuracy on the test data
    before and after (drop in points), the held-out figures the repair itself measured, what it selected,
    and its time. ``profile`` defaults to a fresh scan of the ``per_class`` subset."""
    from guard.repair.pruning import profile_triggers
    from guard.repair.run import repair_model

    xs, ys = per_class_subset(x, y, per_class, seed=seed)
    if profile is None:
        from guard.scan import build_profile

        profile, _ = build_profile(model, xs, ys, seed=seed, progress=progress)
    labels, masks, patterns = profile_triggers(profile)
    acc0, asr0 = accuracy(model, x_test, y_test), attack_success(model, attack, x_test, y_test)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        r = repair_model(model, xs, ys, labels=labels, masks=masks, patterns=patterns, method=method,
                         max_drop=max_drop, seed=seed, progress=progress)
        m = r["model"] if r["model"] is not None else model
        acc1 = accuracy(m, x_test, y_test)
        rows.append({
            "world": world, "attack": type(attack).__name__, "method": method, "per_class": per_class,
            "suspect_labels": labels, "ok": r["ok"], "selected": r["selected"],
            "real_asr_before": asr0, "real_asr_after": attack_success(m, attack, x_test, y_test),
            "accuracy_before": acc0, "accuracy_after": acc1, "accuracy_drop_points": 100 * (acc0 - acc1),
            "heldout_accuracy_before": r["accuracy_before"], "heldout_accuracy_after": r["accuracy_after"],
            "heldout_drop_points": 100 * (r["accuracy_before"] - r["accuracy_after"]),
            "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'world':<14} {'method':<13} {'real ASR':>17} {'test acc':>15} {'drop':>6} {'held-out drop':>13} {'s':>5}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['world']:<14} {r['method']:<13} {100 * r['real_asr_before']:7.1f}% -> "
                     f"{100 * r['real_asr_after']:5.1f}% {100 * r['accuracy_before']:5.1f} -> "
                     f"{100 * r['accuracy_after']:5.1f}"
                     f" {r['accuracy_drop_points']:6.1f} {r['heldout_drop_points']:13.1f} {r['seconds']:5.0f}")
    return "\n".join(lines)


def demo_worlds(out_dir, names=("demo", "gap", "blended")):
    """``(name, model, attack, x_clean, y_clean, x_test, y_test)`` for the named benchmark worlds (seeded)."""
    from pathlib import Path

    import torch

    from guard.data import load_npz, split
    from guard.demo.attacks import BadNets, Blended
    from guard.demo.world import build
    from guard.model import load_model

    out = Path(out_dir)
    for name in names:
        if name in ("demo", "blended"):
            atk = None if name == "demo" else Blended(target=6, alpha=0.2, seed=0)
            w = build(out / name, attack=atk)
            x, y = load_npz(w.clean)
            xt, yt = load_npz(w.holdout)
            yield name, load_model(w.model_file, w.weights), w.attack, x, y, xt, yt
        elif name == "gap":
            from guard.demo.glyphs import digits
            from guard.demo.nets.gap_net import GapNet
            from guard.demo.train import train

            x, y = digits(size=16)
            xtr, ytr, xte, yte = split(x, y, 0.7, seed=0)
            atk = BadNets(target=3, size=3, position="top-left", seed=5)
            xp, yp = atk.poison(xtr, ytr, rate=0.1, seed=0)
            torch.manual_seed(0)
            yield name, train(GapNet(), xp, yp, epochs=12, seed=0, lr=3e-3), atk, xtr, ytr, xte, yte
        else:
            raise ValueError(f"unknown world {name!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worlds", default="demo,gap,blended")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, atk, x, y, xt, yt in demo_worlds(d, args.worlds.split(",")):
            rows += repair_rows(model, atk, x, y, xt, yt, methods=args.methods.split(","), per_class=args.per_class,
                                world=name)
            if not args.json:
                print(format_rows([r for r in rows if r["world"] == name]), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
