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
    args = p.parse_args(argv)
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
