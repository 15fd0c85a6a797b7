"""Adaptive attacker: how the online checks hold up when the trigger is not stamped exactly as trained.

An attacker who knows a guard is deployed will not send the textbook trigger. This module perturbs
the demo BadNets trigger (a 3x3 patch; any :class:`~guard.demo.attacks.BadNets` works) the ways a cheap
adaptive attacker would, and measures at the guard's *calibrated* thresholds (the profile's, no
re-tuning) on inputs whose true label is not the target:

* ``opacity``: the patch blended in at alpha < 1 (fainter trigger);
* ``shift``: the patch moved by a few pixels (dy, dx);
* ``occlude``: some patch pixels left as the original image (partly hidden trigger);
* ``scale``: the patch drawn at another size (nearest-neighbour), same corner;
* ``resize``: the whole stamped image downscaled and upscaled back (bilinear), as a client pipeline might.

Per variant: ``attack_success`` (share the bare model sends to the target: does the variant still
work?), ``tpr`` (share the guard flags), ``tpr_effective`` (share flagged among those the backdoor
still fires on: the number that matters; a variant that no longer fires is harmless), ``residual``
(share both hijacked and passed: the attack's success *through* the guard) and each check's TPR.
The clean false-positive rate at the same thresholds is reported once.

``python -m guard.bench.adaptive --world DIR --profile DIR [--json OUT]`` prints a markdown table
(``DIR`` as written by :func:`guard.demo.world.build`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.demo.attacks import BadNets, patch_corner


@dataclass(frozen=True)
class Variant:
    """One way of stamping the trigger: ``family`` groups variants, ``param`` is its strength."""

    name: str
    family: str
    param: Any
    stamp: Callable[[np.ndarray], np.ndarray]


def _top_left(attack: BadNets, shape: tuple[int, int, int], size: int | None = None) -> tuple[int, int]:
    """Top-left of the patch for ``attack`` (``size`` overrides the patch size, same corner anchor)."""
    _, h, w = shape
    return patch_corner(size or attack.size, h, w, attack.position, attack.margin)


def _paste(x: np.ndarray, patch: np.ndarray, r: int, c: int, alpha: float | np.ndarray = 1.0) -> np.ndarray:
    """Blend ``patch`` (C, s, s) into every image of ``x`` at (r, c), clipped to the image."""
    out = np.array(x, dtype=np.float32, copy=True)
    _, _, h, w = out.shape
    s_h, s_w = patch.shape[1:]
    r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + s_h, h), min(c + s_w, w)
    if r0 >= r1 or c0 >= c1:
        return out
    p = patch[:, r0 - r:r1 - r, c0 - c:c1 - c]
    a = alpha if np.isscalar(alpha) else np.asarray(alpha)[r0 - r:r1 - r, c0 - c:c1 - c]
    region = out[:, :, r0:r1, c0:c1]
    out[:, :, r0:r1, c0:c1] = (1 - a) * region + a * p
    return out


def _resize_image(x: np.ndarray, factor: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    h, w = t.shape[-2:]
    small = F.interpolate(t, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bilinear",
                          align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1).numpy()


def variants(attack: BadNets, shape: tuple[int, int, int], *, seed: int = 0) -> list[Variant]:
    """The standard set: reference, opacity, shift, occlusion, patch scale, whole-image resize."""
    c = shape[0]
    pattern = attack._pattern(c)
    s = attack.size
    r, col = _top_left(attack, shape)
    rng = np.random.default_rng(seed)
    out = [Variant("reference", "reference", 0, attack.stamp)]
    for alpha in (0.75, 0.5, 0.35, 0.25):
        out.append(Variant(f"opacity {alpha:g}", "opacity", alpha, lambda x, a=alpha: _paste(x, pattern, r, col, a)))
    for dy, dx in ((1, 1), (-1, -1), (0, -2), (-2, -2), (-4, -4), (-8, -8), (-14, -14)):
        out.append(Variant(f"shift {dy:+d},{dx:+d}", "shift", (dy, dx),
                           lambda x, dy=dy, dx=dx: _paste(x, pattern, r + dy, col + dx)))
    order = rng.permutation(s * s)
    for k in (1, 3, 5):
        keep = np.ones(s * s, dtype=np.float32)
        keep[order[:k]] = 0
        mask = keep.reshape(s, s)
        out.append(Variant(f"occlude {k}/{s * s} px", "occlude", k,
                           lambda x, m=mask: _paste(x, pattern, r, col, m)))
    for size in (2, 4, 6):
        idx = (np.arange(size) * s // size)
        scaled = pattern[:, idx][:, :, idx]
        rr, cc = _top_left(attack, shape, size)
        out.append(Variant(f"scale {s}->{size} px", "scale", size, lambda x, p=scaled, a=rr, b=cc: _paste(x, p, a, b)))
    for factor in (0.75, 0.5):
        out.append(Variant(f"resize x{factor:g} and back", "resize", factor,
                           lambda x, f=factor: _resize_image(attack.stamp(x), f)))
    return out


def _predict_labels(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).argmax(1).numpy())
    return np.concatenate(out)


def _scores(guard, x: np.ndarray, batch: int) -> np.ndarray:
    """``(N, n_checks)`` check scores in ``guard.names`` order (what ``Guard.run`` compares to thresholds)."""
    parts = []
    for i in range(0, len(x), batch):
        sc = guard.score(np.ascontiguousarray(x[i:i + batch], dtype=np.float32))
        parts.append(np.stack([sc[n] for n in guard.names], 1))
    return np.concatenate(parts) if parts else np.zeros((0, len(guard.names)), np.float32)


def operating_thresholds(guard, calibration: np.ndarray, fprs: Sequence[float], *,
                         batch: int = 256) -> dict[str, float]:
    """The ensemble's threshold at other operating points, calibrated as ``guard scan --fpr F`` does.

    The threshold on the guard's decision statistic that lets ``F`` of the clean ``calibration``
    inputs through: what a looser or stricter profile would trade, without rescanning. The clean FPR
    reached on held-out inputs is measured by :func:`evaluate`.
    """
    s = _scores(guard, calibration, batch)
    return {f"--fpr {f:g}": guard.ensemble.threshold_at(s, f) for f in fprs}


def evaluate(guard, attack: BadNets, x: np.ndarray, y: np.ndarray, *,
             variant_list: Sequence[Variant] | None = None, batch: int = 256,
             extra_thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """TPRs of ``guard`` (a :class:`guard.online.Guard`, as calibrated) per trigger variant.

    ``x, y`` are clean inputs and their true labels; the victims (true label not the target) are
    stamped with each variant. An input is flagged when the guard's ensemble statistic is over its
    threshold (what ``Guard.run`` does: rejected in enforce mode, flagged in shadow); each check's
    TPR is at its own threshold. Returns JSON-ready figures: ``clean_fpr``, ``n_victims`` and one row
    per variant (see the module docstring); ``extra_thresholds`` (name -> ensemble threshold, e.g.
    from :func:`operating_thresholds`) adds each variant's ``tpr_effective`` and the clean FPR at
    those operating points.
    """
    keep = attack.victims(y)
    xv = np.ascontiguousarray(x[keep], dtype=np.float32)
    names = list(guard.names)
    points = {"calibrated": float(guard.ensemble.threshold_), **(extra_thresholds or {})}
    clean_stat = guard.statistic(_scores(guard, x, batch))
    rows = []
    for v in variant_list or variants(attack, tuple(x.shape[1:])):
        xs = np.clip(v.stamp(xv), 0, 1).astype(np.float32)
        hijacked = _predict_labels(guard.model, xs) == attack.target
        sc = _scores(guard, xs, batch)
        stat = guard.statistic(sc)
        over = sc > guard.thresholds
        flagged = stat > points["calibrated"]
        eff = flagged[hijacked].mean() if hijacked.any() else float("nan")
        row = {
            "variant": v.name, "family": v.family, "param": v.param,
            "attack_success": round(float(hijacked.mean()), 4), "tpr": round(float(flagged.mean()), 4),
            "tpr_effective": None if np.isnan(eff) else round(float(eff), 4),
            "residual": round(float((hijacked & ~flagged).mean()), 4),
            "per_check_tpr": {n: round(float(over[:, j].mean()), 4) for j, n in enumerate(names)},
        }
        if extra_thresholds:
            row["tpr_effective_at"] = {
                k: (round(float((stat[hijacked] > t).mean()), 4) if hijacked.any() else None)
                for k, t in extra_thresholds.items()}
        rows.append(row)
    return {"n_victims": int(keep.sum()), "n_clean": int(len(x)),
            "clean_fpr": round(float((clean_stat > points["calibrated"]).mean()), 4),
            "clean_fpr_at": {k: round(float((clean_stat > t).mean()), 4) for k, t in points.items()},
            "mode": guard.mode,
            "thresholds": {n: float(t) for n, t in zip(names, guard.thresholds)} | {"ensemble": points["calibrated"]},
            "variants": rows}


def run_demo(world_dir: str | Path, profile_dir: str | Path, *, limit: int | None = None,
             fprs: Sequence[float] = (0.01, 0.02, 0.05)) -> dict[str, Any]:
    """:func:`evaluate` on a demo world directory (holdout.npz, clean.npz, model.py, weights.pt) and its
    profile, with extra operating points recalibrated on clean.npz as ``guard scan --fpr`` would."""
    from guard.data import load_npz
    from guard.model import load_model
    from guard.online import Guard
    from guard.profile import Profile

    world = Path(world_dir)
    meta = json.loads((world / "world.json").read_text()) if (world / "world.json").exists() else {}
    model = load_model(world / "model.py", world / "weights.pt")
    guard = Guard(model, Profile.load(profile_dir), mode="enforce")
    x, y = load_npz(world / "holdout.npz")
    if limit:
        x, y = x[:limit], y[:limit]
    attack = BadNets(target=int(meta.get("target", 6) or 6))
    extra = operating_thresholds(guard, load_npz(world / "clean.npz")[0], fprs) if fprs else None
    return evaluate(guard, attack, x, y, extra_thresholds=extra)


def to_markdown(results: dict[str, Any]) -> str:
    """The figures as a markdown table (one row per variant)."""
    names = [n for n in results["thresholds"] if n != "ensemble"]
    extra = [k for k in results.get("clean_fpr_at", {}) if k != "calibrated"]

    def f3(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    head = ("| variant | attack success | TPR | TPR on hijacked | residual success | "
            + " | ".join(f"{n} TPR" for n in names)
            + "".join(f" | TPR on hijacked at {k}" for k in extra) + " |")
    sep = "|" + "---|" * (5 + len(names) + len(extra))
    lines = [head, sep]
    for r in results["variants"]:
        at = r.get("tpr_effective_at", {})
        lines.append(f"| {r['variant']} | {r['attack_success']:.3f} | {r['tpr']:.3f} | {f3(r['tpr_effective'])} | "
                     f"{r['residual']:.3f} | " + " | ".join(f"{r['per_check_tpr'][n]:.3f}" for n in names)
                     + "".join(f" | {f3(at.get(k))}" for k in extra) + " |")
    lines.append("")
    fpr_at = ", ".join(f"{k}: {v:.3f}" for k, v in results.get("clean_fpr_at", {}).items())
    lines.append(f"{results['n_victims']} non-target held-out images per variant; clean false-positive rate of the "
                 f"ensemble ({results['n_clean']} held-out images) {fpr_at}; mode {results['mode']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guard.bench.adaptive", description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="demo world directory (guard.demo.world.build)")
    p.add_argument("--profile", required=True, help="its profile directory")
    p.add_argument("--limit", type=int, help="use the first N held-out images")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    results = run_demo(args.world, args.profile, limit=args.limit)
    print(to_markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["Variant", "evaluate", "operating_thresholds", "run_demo", "to_markdown", "variants"]
