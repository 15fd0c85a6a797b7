"""Running a model for a result: its labels and accuracy on a batch, the labels a dataset may hold, and
:func:`frozen`, the eval mode without parameter gradients that every scan runs under."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from guard.errors import InputError


def validate_labels(y: np.ndarray | None, k: int) -> None:
    """InputError unless every label of ``y`` is one of the model's ``k`` classes (``0 .. k - 1``)."""
    if y is None or not np.size(y):
        return
    lo, hi = int(np.min(y)), int(np.max(y))
    if lo < 0 or hi >= k:
        raise InputError(f"data labels go from {lo} to {hi} but the model has {k} classes (0..{k - 1})")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Predicted labels of ``x``, batched, each batch on the model's device, in the mode the caller left the
    model in: callers put it in eval mode (:func:`frozen`, ``guard.purify.triggers.model_labels``)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)).argmax(1).cpu())
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of ``x`` the model labels ``y``."""
    return float((predict(model, x) == y).mean())


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the duration; restores both on exit.

    Scans optimise inputs, never weights: BatchNorm statistics and dropout must not move, and the
    caller's ``requires_grad`` flags and train/eval mode come back exactly as they were.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
