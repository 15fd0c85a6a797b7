"""Shared machinery of the trigger-reversing scans: the tanh mask/pattern parametrisation, stamping
many candidate triggers onto one batch in a single forward, and one trigger onto a numpy batch."""

from __future__ import annotations

import numpy as np
import torch


def to_raw(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of ``tanh(raw) / 2 + 0.5``: the free variable whose image is ``v`` in (0, 1)."""
    return torch.atanh((v.clamp(eps, 1 - eps) - 0.5) * 2)


def from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's box constraint: ``tanh(raw) / 2 + 0.5`` maps any real to (0, 1)."""
    return torch.tanh(raw) / 2 + 0.5


def stamp(x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """``(1 - mask) * x + mask * pattern`` for a batch (mask ``(1, H, W)``, pattern ``(C, H, W)``)."""
    return ((1 - mask) * x + mask * pattern).astype(np.float32)


def stamp_all(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Apply K triggers to a batch of B images at once: returns ``(K * B, C, H, W)``.

    ``masks`` is ``(K, 1, H, W)``, ``patterns`` ``(K, C, H, W)``; row ``k * B + b`` is image b with
    trigger k. One forward over the result optimises every label's trigger in one batched problem.
    """
    k = masks.shape[0]
    stamped = (1 - masks[:, None]) * x[None] + (masks * patterns)[:, None]
    return stamped.reshape(k * x.shape[0], *x.shape[1:])
