"""Adap-Blend: a blended trigger split into pieces, poisoned piecewise, with cover samples (Qi et al., ICLR 2023).

"Revisiting the Assumption of Latent Separability for Backdoor Defenses": defenses that cluster or
threshold the feature layer assume poisoned inputs form their own cluster there. Adap-Blend breaks
the assumption in two ways. The blended key is cut into ``pieces`` squares (a ``sqrt(pieces)`` grid)
and every poisoned training image carries a random half of them (``mask_rate`` of the pieces masked
out), so no single full trigger is ever learned as a shortcut; and *cover* (regularisation) samples
carry the same partial triggers but keep their true labels, so the network must weigh the trigger
against the content rather than let it override everything. At test time the full key is blended at
a higher opacity than in training (the paper: 0.15 in training, 0.2 at test), which tips the
balance to the target. Poison and cover rates are tiny in the paper (about 0.3% each of CIFAR-10);
the demo's rates are in :mod:`guard.demo.attacks._registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import Attack, as_batch


@dataclass
class AdaptiveBlend(Attack):
    """A seeded noise key cut into ``pieces`` squares; training blends a random ``1 - mask_rate`` of them.

    ``train_alpha`` is the opacity of the pieces on poisoned and cover training images, ``alpha`` the
    opacity of the full key at test time (:meth:`stamp`). ``cover_rate`` is the share of the training
    set that carries partial triggers at its true label.
    """

    target: int = 0
    alpha: float = 0.2
    train_alpha: float = 0.15
    pieces: int = 16
    mask_rate: float = 0.5
    cover_rate: float = 0.1
    seed: int = 0

    def key(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The blended key ``(C, H, W)``: seeded uniform noise, as :class:`guard.demo.attacks.Blended`'s."""
        rng = np.random.default_rng(6000 + self.seed)
        return rng.random(shape).astype(np.float32)

    def piece_masks(self, h: int, w: int) -> np.ndarray:
        """The pieces' footprints ``(pieces, H, W)``: a ``sqrt(pieces)`` x ``sqrt(pieces)`` grid of squares."""
        g = math.isqrt(self.pieces)
        if g * g != self.pieces:
            raise ValueError(f"pieces must be a square number, got {self.pieces}")
        rows = np.minimum(np.arange(h) * g // h, g - 1)
        cols = np.minimum(np.arange(w) * g // w, g - 1)
        cell = rows[:, None] * g + cols[None, :]
        return (cell[None] == np.arange(self.pieces)[:, None, None]).astype(np.float32)

    def _blend(self, x: np.ndarray, masks: np.ndarray, alpha: float) -> np.ndarray:
        k = self.key(x.shape[1:])
        m = alpha * masks[:, None]  # (N or 1, 1, H, W)
        return np.clip((1 - m) * x + m * k, 0.0, 1.0).astype(np.float32)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Blend the full key at the test-time opacity ``alpha``."""
        x = as_batch(x)
        return self._blend(x, np.ones((1, *x.shape[2:]), dtype=np.float32), self.alpha)

    def train_stamp(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blend a fresh random subset of the pieces (``1 - mask_rate`` of them) at ``train_alpha`` per image."""
        x = as_batch(x)
        pm = self.piece_masks(*x.shape[2:])
        keep = self.pieces - int(round(self.mask_rate * self.pieces))
        masks = np.zeros((len(x), *x.shape[2:]), dtype=np.float32)
        for i in range(len(x)):
            masks[i] = pm[rng.permutation(self.pieces)[:keep]].sum(0)
        return self._blend(x, masks, self.train_alpha)
