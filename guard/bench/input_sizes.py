"""What a scan costs as inputs grow: ``guard scan``'s two parts (the profile: Neural Cleanse, the checks and their
calibration; then the warp reversal) on the same network and task at 32x32, 64x64 and 224x224, timed, with
the verdicts and the online guard's detection on each.

The network is :mod:`guard.demo.nets.tv_resnet` (torchvision's ResNet-18 layout, ImageNet stem, width 8), the
task the glyphs drawn at each size, the backdoor a BadNets patch to label 6 whose side grows with the image
(3, 5 and 16 pixels). Worlds are trained once in ``work_dir`` and reused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (32, 64, 224)


def patch_side(size: int) -> int:
    """The BadNets patch's side at ``size``: 3 pixels at 32, growing with the image (16 at 224)."""
    return max(3, round(3 * size / 42))


def size_world(out_dir: Path, size: int, *, seed: int = 0, n_train: int = 2000, epochs: int = 3,
               n_clean: int = 600) -> Any:
    """The BadNets tv_resnet world at ``size`` (built in ``out_dir``, or reused when its world.json is there)."""
    from guard.demo.attacks import BadNets
    from guard.demo.world import DEMO_TARGET, build, built

    out = Path(out_dir)
    done = built(out)
    if done is not None:
        return done
    return build(out, net="tv_resnet", size=size, seed=seed, n_train=n_train, n_clean=n_clean, n_holdout=400,
                 epochs=epochs, attack=BadNets(target=DEMO_TARGET, size=patch_side(size)))


def scan_seconds_by_size(work_dir: Path, *, sizes: tuple[int, ...] = SIZES, seed: int = 0, n_train: int = 2000,
                         epochs: int = 3, n_clean: int = 600) -> dict[str, Any]:
    """``guard scan``'s default profile and warp reversal at each input size, timed (see the module).

    Returns ``scan_seconds_by_size`` (profile + warp reversal, seconds, per size) and ``by_size``: the world's
    clean accuracy and attack success, each part's seconds, the suspect labels of each, whether the target
    was found, and the guard's share of held-out triggered inputs stopped and of clean ones rejected.
    """
    import torch

    from guard.data import load_npz
    from guard.demo.world import DEMO_TARGET
    from guard.model import load_model
    from guard.online import Guard
    from guard.scan import build_profile
    from guard.scan.neural_cleanse import NeuralCleanse
    from guard.scan.warp import WarpReversal

    seconds: dict[str, float] = {}
    detail: dict[str, Any] = {}
    for size in sizes:
        w = size_world(Path(work_dir) / f"tv_resnet-{size}-seed{seed}", size, seed=seed, n_train=n_train,
                       epochs=epochs, n_clean=n_clean)
        model = load_model(w.model_file, w.weights)
        x, y = load_npz(w.clean)
        t0 = time.perf_counter()
        profile, summary = build_profile(model, x, y, seed=seed, progress=False,
                                         nc=NeuralCleanse(seed=seed, progress=False))
        t1 = time.perf_counter()
        warp = WarpReversal(seed=seed, progress=False).fit(model, x, y)
        t2 = time.perf_counter()
        guard = Guard(model, profile, mode="enforce", verify=False)
        xh, _ = load_npz(w.holdout)
        xt, _ = load_npz(w.triggered)
        with torch.inference_mode():
            stopped = float(np.mean([d.verdict == "rejected" for d in guard.predict(xt)]))
            rejected = float(np.mean([d.verdict == "rejected" for d in guard.predict(xh)]))
        seconds[str(size)] = round(t2 - t0, 1)
        detail[str(size)] = {"profile_seconds": round(t1 - t0, 1), "warp_seconds": round(t2 - t1, 1),
                             "suspect_labels": summary["suspect_labels"],
                             "warp_suspect_labels": list(warp.suspect_labels_),
                             "target_found": DEMO_TARGET in summary["suspect_labels"],
                             "clean_accuracy": round(float(w.clean_accuracy), 4),
                             "attack_success": round(float(w.attack_success), 4), "patch_side": patch_side(size),
                             "triggered_stopped": round(stopped, 4), "clean_rejected": round(rejected, 4),
                             "clean_images": int(len(x))}
    lo, hi = str(min(sizes)), str(max(sizes))
    return {"scan_seconds_by_size": seconds, "by_size": detail, "net": "tv_resnet",
            "ratio_max_over_min_size": round(seconds[hi] / max(seconds[lo], 1e-9), 2) if lo != hi else None}


__all__ = ["SIZES", "patch_side", "scan_seconds_by_size", "size_world"]
