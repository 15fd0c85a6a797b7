"""An opt-in prediction-consistency check, evaluated by the benchmark next to the guard (not wired in).

A fixed trigger is tied to where it sits: mirroring the image moves a corner patch to the other
corner and turns WaNet's fixed warping field into another field, so the backdoor stops firing and
the prediction falls back to the true class, while a clean image of a mirror-symmetric class (or one
from a model trained with flips, as almost every image model is) keeps its label (Li et al., 2021,
"Backdoor attack in the physical world": flipping and shrinking defeat static triggers). The score is
``1 - p(label | mirrored x)`` for the label the model gave ``x``: one extra forward pass per query,
which is why it is not part of the guard's hot path (the batch-1 overhead bar is 1.15x the bare
forward; this check alone costs about 2x). The guard's checks score a record of one forward pass;
wiring this one in needs the Guard to run the second pass, a change to ``guard/online/guard.py``.

Here it is calibrated like the guard's checks (on the held-out clean half) and reported alone and
joined to the guard's checks in one ensemble (:class:`guard.online.ensemble.FisherEnsemble` over the
guard's checks plus this one, threshold at ``fpr``), as the guard would run it if it were wired in.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.evaluation import at_threshold, separation
from guard.online.ensemble import FisherEnsemble


def flip_scores(model: nn.Module, x: np.ndarray, *, batch: int = 512) -> np.ndarray:
    """``1 - p(argmax label of x | horizontally mirrored x)`` per input: higher = more suspect."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
            label = model(xb).argmax(1)
            p = torch.softmax(model(torch.flip(xb, dims=[3])), 1)
            out.append((1 - p.gather(1, label[:, None]).squeeze(1)).numpy())
    return np.concatenate(out).astype(np.float64)


def evaluate(model: nn.Module, cal: np.ndarray, neg: np.ndarray, pos: np.ndarray, guard_cal: np.ndarray,
             guard_neg: np.ndarray, guard_pos: np.ndarray, *, fpr: float) -> dict[str, Any]:
    """The flip check alone and in one calibrated ensemble with the guard's checks (threshold at ``fpr``)."""
    fc, fn_, fp = flip_scores(model, cal), flip_scores(model, neg), flip_scores(model, pos)
    cal_all = np.column_stack([guard_cal, fc])
    ens = FisherEnsemble().fit(cal_all).infer_threshold(cal_all, fpr=fpr)
    zn = ens.statistic(np.column_stack([guard_neg, fn_]))
    zp = ens.statistic(np.column_stack([guard_pos, fp]))
    return {"flip": separation(fn_, fp, fpr=fpr),
            "combined_with_flip": separation(zn, zp, fpr=fpr) | {
                "verdict": at_threshold(zn > ens.threshold_, zp > ens.threshold_)}}


def flip_cost(model: nn.Module, x: np.ndarray, *, repeats: int = 200) -> dict[str, float]:
    """Median time of the bare batch-1 forward and of forward + mirrored forward (what the check adds)."""
    warmup = 10
    xb = [torch.from_numpy(np.ascontiguousarray(x[i % len(x):i % len(x) + 1])) for i in range(repeats + warmup)]
    bare, both = [], []
    with torch.inference_mode():
        for i, t in enumerate(xb):
            t0 = time.perf_counter()
            model(t)
            t1 = time.perf_counter()
            model(t)
            model(torch.flip(t, dims=[3]))
            t2 = time.perf_counter()
            if i >= warmup:
                bare.append(t1 - t0)
                both.append(t2 - t1)
    b, f = float(np.median(bare)) * 1e3, float(np.median(both)) * 1e3
    return {"bare_p50_ms": round(b, 4), "with_flip_p50_ms": round(f, 4), "ratio": round(f / b, 3)}
