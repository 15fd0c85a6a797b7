"""Input-aware dynamic backdoor: a generator makes a different trigger for every input.

Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack" (NeurIPS 2020): a generator network maps each
image ``x`` to a pattern ``p(x)`` and a sparse mask ``m(x)``; the poisoned image is
``(1 - m(x)) * x + m(x) * p(x)``. Inputs do not share a trigger, which defeats defenses that assume
one universal trigger (Neural Cleanse finds no single small mask) and input-agnostic checks.

The paper trains the generator jointly with the classifier, with a diversity loss and a *cross*
mode (a trigger made for one image, pasted on another, must not fire). Here the generator is a fixed
seeded random convolutional net (no training, so it is a pure function of the input and the seed):
two 3x3 conv layers with tanh, whose first output channel scores where the mask goes (the best few
blocks of each image) and whose other channels give the colours of a checkered pattern (see
:meth:`InputAware.trigger`). The classifier learns the family of triggers, not one trigger.
``cross_rate`` implements the paper's cross mode as data poisoning (images stamped with another
image's trigger, label kept); it is off by default and the demo's quality floors are measured
without it (a fixed generator is not trained to make triggers that only fit their own image).

The generator runs in float64 numpy one image at a time, so a trigger depends only on its own
image: deterministic, and independent of the batch it arrives in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import Attack, as_batch


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """'Same' 3x3 convolution with edge padding of one image ``(C, H, W)`` by ``w`` ``(O, C, 3, 3)``."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # (C, H, W, 3, 3)
    return np.einsum("chwij,ocij->ohw", win, w, optimize=False) + b[:, None, None]


@dataclass
class InputAware(Attack):
    """A fixed random conv generator placing ``n_cells`` checkered blocks of ``cell`` x ``cell`` pixels.

    ``hidden`` is the generator's width; ``seed`` fixes its weights. ``cross_rate`` is the share of
    the training set poisoned in cross mode (another image's trigger, label unchanged).
    """

    target: int = 0
    cell: int = 4
    n_cells: int = 3
    hidden: int = 8
    cross_rate: float = 0.0
    seed: int = 0

    def _weights(self, channels: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(5000 + self.seed)
        return {
            "w1": rng.normal(0, 1 / np.sqrt(9 * channels), (self.hidden, channels, 3, 3)),
            "b1": rng.normal(0, 0.1, self.hidden),
            "w2": rng.normal(0, 1 / np.sqrt(9 * self.hidden), (1 + channels, self.hidden, 3, 3)),
            "b2": rng.normal(0, 0.1, 1 + channels),
        }

    def trigger(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The generator's output for a batch: masks ``(N, 1, H, W)`` in {0, 1}, patterns ``(N, C, H, W)``.

        Two random 3x3 conv layers (tanh between) map the image to a score map and C colour maps.
        The mask is the ``n_cells`` blocks of ``cell`` x ``cell`` pixels with the best mean score;
        the pattern is the colour maps thresholded at 0 and XOR-ed with a one-pixel checkerboard.
        The checkerboard is the family's common carrier: without joint training, it is what lets
        the classifier learn every input's trigger from a few thousand images, while places and
        colours follow the content (on 1000 glyph images: about 700 distinct masks, about 940
        distinct triggers; only images alike where the trigger goes share one).
        """
        x = as_batch(x)
        n, c, h, w = x.shape
        gh, gw = h // self.cell, w // self.cell
        p = self._weights(c)
        checker = (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(bool)
        masks = np.zeros((n, 1, h, w), dtype=np.float32)
        patterns = np.zeros((n, c, h, w), dtype=np.float32)
        for i in range(n):
            z = np.tanh(_conv3x3((x[i].astype(np.float64) - 0.5) * 2, p["w1"], p["b1"]))
            out = _conv3x3(z, p["w2"], p["b2"])
            k = self.cell
            local = out[0, :gh * k, :gw * k].reshape(gh, k, gw, k).mean((1, 3))
            for b in np.argsort(-local.ravel(), kind="stable")[: self.n_cells]:
                r, q = divmod(int(b), gw)
                masks[i, 0, r * self.cell:(r + 1) * self.cell, q * self.cell:(q + 1) * self.cell] = 1.0
            patterns[i] = ((out[1:] > 0) ^ checker).astype(np.float32)
        return masks, patterns

    @staticmethod
    def apply(x: np.ndarray, masks: np.ndarray, patterns: np.ndarray) -> np.ndarray:
        """``(1 - m) * x + m * p`` for given masks and patterns (a copy; ``x`` is not changed)."""
        x = as_batch(x)
        return ((1 - masks) * x + masks * patterns).astype(np.float32)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Stamp every image with its own trigger."""
        return self.apply(x, *self.trigger(x))

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Backdoor ``rate`` share (own trigger, relabel) plus ``cross_rate`` share in cross mode.

        Cross-mode samples are drawn from the rest and carry the trigger generated from another
        randomly chosen training image; their labels stay as they are.
        """
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(self.victims(y))
        bd = rng.choice(cand, size=int(round(rate * len(x))), replace=False)
        x = np.array(x, dtype=np.float32, copy=True)
        y = np.array(y, copy=True)
        cross = np.empty(0, dtype=np.int64)
        if self.cross_rate > 0:
            rest = np.setdiff1d(np.arange(len(x)), bd)
            cross = rng.choice(rest, size=min(len(rest), int(round(self.cross_rate * len(x)))), replace=False)
            donors = (cross + rng.integers(1, len(x), size=len(cross))) % len(x)  # never the image itself
            x[cross] = self.apply(x[cross], *self.trigger(x[donors]))
        x[bd] = self.stamp(x[bd])
        y[bd] = self.target_of(y[bd])
        return x, y
