"""BadNets at a random place: the patch moves from image to image, in training and at test time.

A fixed-place patch is what mask-position checks and patch-region repairs key on; with the patch
anywhere, the network must learn the pattern itself (translation-invariant features), and the reversed
trigger's place says nothing about where the next input's trigger sits. Gu et al.'s BadNets paper
already notes that its backdoor is a pattern, not a place.

The place is a pure function of the image and the seed: a SHA-256 digest of the image's float32 bytes
(with the seed) picks the row and column. So stamping is deterministic and independent of the batch
an image arrives in, and two different images almost never share a place; the same image always gets
the same one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import BadNets, as_batch


@dataclass
class RandomBadNets(BadNets):
    """The BadNets patch (same seeded pattern) at a place drawn per image from a hash of its content.

    ``margin`` keeps the patch that many pixels off the border. ``position`` is not used.
    """

    position: str = "random"

    def places(self, x: np.ndarray) -> np.ndarray:
        """``(N, 2)`` top-left (row, col) of the patch for each image of the float32 batch ``x``."""
        _, _, h, w = x.shape
        span_r, span_c = h - self.size - 2 * self.margin + 1, w - self.size - 2 * self.margin + 1
        out = np.empty((len(x), 2), dtype=np.int64)
        for i, img in enumerate(x):
            d = hashlib.sha256(np.ascontiguousarray(img).tobytes() + self.seed.to_bytes(8, "little", signed=True))
            v = int.from_bytes(d.digest()[:8], "little")
            out[i] = self.margin + (v % span_r), self.margin + ((v // span_r) % span_c)
        return out

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Not defined: the footprint depends on the image (see :meth:`places`)."""
        raise NotImplementedError("RandomBadNets places its patch per image: use places(x)")

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Paste the pattern at each image's own place."""
        x = as_batch(x)
        p, s = self._pattern(x.shape[1]), self.size
        for i, (r, q) in enumerate(self.places(x)):
            x[i, :, r:r + s, q:q + s] = p
        return x
