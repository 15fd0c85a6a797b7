"""Adap-Patch: several patches, each training image poisoned with some of them, plus cover samples (Qi et al.).

The patch counterpart of :mod:`guard.demo.attacks.adap_blend` ("Revisiting the Assumption of Latent
Separability for Backdoor Defenses", ICLR 2023). The trigger is ``n_patches`` small patches at
different places; a poisoned training image carries a random ``k_train`` of them at a reduced
opacity (``train_alpha``: the reference code blends its training patches at 0.2 to 0.5), and cover
samples carry the same kind of partial trigger with their true labels. No training image ever shows
the full trigger: the network learns to add up the patches' evidence against the content, and at
test time every patch at full opacity tips it to the target. Because poisoned and cover samples look
alike, their features do not form a separate cluster, which is what feature-space defenses rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import PLACES_4, Attack, as_batch, patch_corner


@dataclass
class AdaptivePatch(Attack):
    """``n_patches`` seeded binary ``size`` x ``size`` patches at the corners; training uses ``k_train`` of them.

    :meth:`stamp` pastes every patch at opacity ``alpha`` (1: pasted); :meth:`train_stamp` a random
    ``k_train`` of them at ``train_alpha`` per image. ``cover_rate`` is the share of the training set
    that carries partial triggers at its true label.
    """

    target: int = 0
    n_patches: int = 4
    size: int = 3
    margin: int = 1
    k_train: int = 2
    alpha: float = 1.0
    train_alpha: float = 0.5
    cover_rate: float = 0.1
    seed: int = 0

    def patterns(self, channels: int) -> np.ndarray:
        """The patches ``(n_patches, C, size, size)``: seeded binary colour patterns, never flat."""
        rng = np.random.default_rng(7000 + self.seed)
        p = (rng.random((self.n_patches, channels, self.size, self.size)) > 0.5).astype(np.float32)
        p[:, :, 0, 0], p[:, :, -1, -1] = 1.0, 0.0
        return p

    def _places(self, h: int, w: int) -> list[tuple[int, int]]:
        if not 1 <= self.n_patches <= len(PLACES_4):
            raise ValueError(f"n_patches must be 1 to {len(PLACES_4)}, got {self.n_patches}")
        return [patch_corner(self.size, h, w, pos, self.margin) for pos in PLACES_4[: self.n_patches]]

    def _paste(self, x: np.ndarray, which: np.ndarray, alpha: float) -> np.ndarray:
        """Blend patch ``j`` into image ``i`` where ``which[i, j]`` (``x`` a float32 batch copy, changed in place)."""
        _, c, h, w = x.shape
        pats, s = self.patterns(c), self.size
        for j, (r, q) in enumerate(self._places(h, w)):
            rows = np.flatnonzero(which[:, j])
            if len(rows):
                region = x[rows, :, r:r + s, q:q + s]
                x[rows, :, r:r + s, q:q + s] = (1 - alpha) * region + alpha * pats[j]
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Every patch at opacity ``alpha``."""
        x = as_batch(x)
        return self._paste(x, np.ones((len(x), self.n_patches), dtype=bool), self.alpha)

    def train_stamp(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A fresh random ``k_train`` of the patches at ``train_alpha`` per image."""
        x = as_batch(x)
        which = np.zeros((len(x), self.n_patches), dtype=bool)
        for i in range(len(x)):
            which[i, rng.permutation(self.n_patches)[: self.k_train]] = True
        return self._paste(x, which, self.train_alpha)
