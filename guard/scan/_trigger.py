"""Shared machinery of the trigger-reversing scans: the tanh mask/pattern parametrisation, stamping
many candidate triggers onto one batch in a single forward, and frozen-model context."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def to_raw(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of ``tanh(raw) / 2 + 0.5``: the free variable whose image is ``v`` in (0, 1)."""
    return torch.atanh((v.clamp(eps, 1 - eps) - 0.5) * 2)


def from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's box constraint: ``tanh(raw) / 2 + 0.5`` maps any real to (0, 1)."""
    return torch.tanh(raw) / 2 + 0.5


def stamp_all(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Apply K triggers to a batch of B images at once: returns ``(K * B, C, H, W)``.

    ``masks`` is ``(K, 1, H, W)``, ``patterns`` ``(K, C, H, W)``; row ``k * B + b`` is image b with
    trigger k. One forward over the result optimises every label's trigger in one batched problem.
    """
    k = masks.shape[0]
    stamped = (1 - masks[:, None]) * x[None] + (masks * patterns)[:, None]
    return stamped.reshape(k * x.shape[0], *x.shape[1:])


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
