"""What one guarded forward pass saw, in the arrays every check scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Record:
    """What one guarded forward pass saw: inputs ``x`` (N, C, H, W), ``logits`` (N, K),
    feature-layer activations ``features`` (N, D) and, where the profile has an inner layer, its
    pooled activations ``inner`` (N, 2C; :func:`pool`), all float32 numpy arrays."""

    x: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    inner: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, idx) -> Record:
        return Record(self.x[idx], self.logits[idx], self.features[idx],
                      None if self.inner is None else self.inner[idx])
