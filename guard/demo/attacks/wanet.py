"""WaNet: an imperceptible warping trigger (Nguyen and Tran, ICLR 2021).

"WaNet - Imperceptible Warping-based Backdoor Attack": the trigger is a fixed, smooth elastic warp
of the image. A random ``k x k`` field of 2-D offsets in [-1, 1], normalised by its mean absolute
value, is upsampled bicubically to ``H x W``; the sampling grid is the identity grid plus
``strength * field / H`` (clamped to [-1, 1]) and the image is resampled with ``grid_sample``. The
change depends on the image content (it moves edges, not a fixed pattern), so the trigger is
input-specific and no patch detector sees it.

The paper's *noise mode* is what makes the backdoor warp-specific: besides the ``rate`` share of
backdoor samples (warped, relabelled), a ``noise_rate`` share (the reference code's
``cross_ratio * rate``) is warped with the same grid plus fresh per-sample random offsets and keeps
its label, so the network must learn the exact warp rather than "any warp". Poisoning is therefore
overridden here. The reference values are ``k = 4``, ``strength = 0.5``, ``cross_ratio = 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guard.demo.attacks._base import Attack, as_batch


@dataclass
class WaNet(Attack):
    """A seeded warping field of ``grid_k`` x ``grid_k`` control points and strength ``strength``.

    ``strength`` is in the paper's units (``s``): offsets of ``strength * field / H`` in the
    normalised [-1, 1] coordinates of ``grid_sample``, i.e. about ``strength / 2`` pixels times the
    field's magnitude. ``noise_rate`` is the share of the training set poisoned in noise mode, whose
    per-pixel random offsets are uniform in ``noise_scale * [-1, 1] / H`` (the paper: ``noise_scale = 1``).
    """

    target: int = 0
    grid_k: int = 4
    strength: float = 0.5
    noise_rate: float = 0.2
    noise_scale: float = 1.0
    seed: int = 0

    def field(self, size: int) -> np.ndarray:
        """The upsampled warping field ``(size, size, 2)`` (x, y offsets, mean |.| about 1)."""
        g = torch.Generator().manual_seed(3000 + self.seed)
        ins = torch.rand(1, 2, self.grid_k, self.grid_k, generator=g, dtype=torch.float64) * 2 - 1
        ins = ins / ins.abs().mean()
        up = F.interpolate(ins, size=(size, size), mode="bicubic", align_corners=True)
        return up.permute(0, 2, 3, 1)[0].numpy()

    def grid(self, h: int, w: int) -> np.ndarray:
        """The sampling grid ``(H, W, 2)`` for ``grid_sample``: identity + ``strength * field / H``."""
        if h != w:
            raise ValueError(f"WaNet's reference grid is square; got {h}x{w}")
        lin = np.linspace(-1.0, 1.0, h)
        yy, xx = np.meshgrid(lin, lin, indexing="ij")
        identity = np.stack([xx, yy], axis=-1)
        return np.clip(identity + self.strength * self.field(h) / h, -1.0, 1.0)

    @staticmethod
    def _warp(x: np.ndarray, grids: np.ndarray) -> np.ndarray:
        """Resample ``x`` ``(N, C, H, W)`` at ``grids`` ``(N or 1, H, W, 2)`` (bilinear, as the paper)."""
        xt = torch.from_numpy(x).double()
        gt = torch.from_numpy(np.ascontiguousarray(grids)).double().expand(len(x), -1, -1, -1)
        out = F.grid_sample(xt, gt, mode="bilinear", padding_mode="zeros", align_corners=True)
        return np.clip(out.float().numpy(), 0.0, 1.0)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Warp every image of the batch with the fixed grid."""
        x = as_batch(x)
        if len(x) == 0:
            return x
        return self._warp(x, self.grid(*x.shape[2:])[None])

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Backdoor ``rate`` share (warp, relabel) plus ``noise_rate`` share in noise mode (label kept).

        Noise-mode samples get the grid plus uniform offsets in ``noise_scale * [-1, 1] / H`` per pixel,
        fresh per sample, as in the reference code; they are drawn from the samples not backdoored.
        """
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(self.victims(y))
        n_bd = int(round(rate * len(x)))
        bd = rng.choice(cand, size=n_bd, replace=False)
        rest = np.setdiff1d(np.arange(len(x)), bd)
        noise = rng.choice(rest, size=min(len(rest), int(round(self.noise_rate * len(x)))), replace=False)
        x = np.array(x, dtype=np.float32, copy=True)
        y = np.array(y, copy=True)
        x[bd] = self.stamp(x[bd])
        y[bd] = self.target_of(y[bd])
        if len(noise):
            h, w = x.shape[2:]
            jitter = self.noise_scale * rng.uniform(-1.0, 1.0, size=(len(noise), h, w, 2)) / h
            grids = np.clip(self.grid(h, w)[None] + jitter, -1.0, 1.0)
            x[noise] = self._warp(x[noise], grids)
        return x, y
