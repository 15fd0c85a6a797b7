"""What the reversals that read a success curve share (:mod:`guard.scan.blend` for opacities,
:mod:`guard.scan.warp` for displacements): the clean images they optimise on and judge on, where each
label's curve crosses the success level, and each label's lead over the easiest other label."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.model import frozen, validate_labels
from guard.stats import largest_other


def reversal_data(model: nn.Module, x: np.ndarray, y: np.ndarray | None, *, n_fit: int, n_eval: int, seed: int,
                  num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int]:
    """What a reversal (blend, warp) learns and judges on: ``n_fit`` clean images to optimise on (at most a
    third of ``x``), up to ``n_eval`` held-out ones with their labels (``y``, else the model's own
    predictions), and the class count (``num_classes``, else the logits'), ``y`` checked against it."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_fit = min(n_fit, max(1, len(x) // 3))
    fit_x = torch.from_numpy(np.ascontiguousarray(x[order[:n_fit]], dtype=np.float32))
    ev = order[n_fit:n_fit + n_eval] if len(x) > n_fit else order
    eval_x = torch.from_numpy(np.ascontiguousarray(x[ev], dtype=np.float32))
    with frozen(model), torch.no_grad():
        k = num_classes or int(model(eval_x[:1]).shape[1])
        validate_labels(y, k)
        eval_y = np.asarray(y)[ev] if y is not None else model(eval_x).argmax(1).numpy()
    return fit_x, eval_x, eval_y.astype(np.int64), k


def leads(needed: np.ndarray) -> np.ndarray:
    """``(K,)`` the share of ``needed`` (opacity, strength: what each label needs) a label saves over the
    easiest *other* label: about 0 for the pack, > 0 for a label ahead of it; 0 when there is no other."""
    needed = np.asarray(needed, dtype=np.float64)
    if len(needed) < 2:
        return np.zeros(len(needed))
    return 1.0 - needed / np.maximum(-largest_other(-needed), 1e-9)


def crossing(alphas: np.ndarray, success: np.ndarray, level: float) -> np.ndarray:
    """``(K,)`` the opacity at which each label's success first reaches ``level``, linearly
    interpolated between the grid's opacities; the last opacity when it never does (censored)."""
    out = np.full(success.shape[1], float(alphas[-1]))
    for j in range(success.shape[1]):
        hit = np.flatnonzero(success[:, j] >= level)
        if not len(hit):
            continue
        i = int(hit[0])
        if i == 0:
            out[j] = float(alphas[0])
            continue
        lo, hi = success[i - 1, j], success[i, j]
        out[j] = float(alphas[i - 1] + (alphas[i] - alphas[i - 1]) * (level - lo) / max(hi - lo, 1e-9))
    return out
