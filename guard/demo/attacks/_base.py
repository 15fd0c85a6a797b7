"""The attack interface and the two classic input-agnostic triggers (BadNets patch, Blended key)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Attack:
    """A backdoor attack: a trigger and an all-to-one (or other) label mapping."""

    target: int = 0

    def stamp(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def target_of(self, y: np.ndarray) -> np.ndarray:
        """Attacker's label for inputs of true label ``y`` (all-to-one by default)."""
        return np.full_like(y, self.target)

    def victims(self, y: np.ndarray) -> np.ndarray:
        """Mask of the inputs whose label the attack changes (the target class itself is excluded)."""
        return self.target_of(y) != y

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Stamp a seeded ``rate`` share of the non-target samples and relabel them."""
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(self.victims(y))
        idx = rng.choice(cand, size=int(round(rate * len(x))), replace=False)
        x, y = x.copy(), y.copy()
        x[idx] = self.stamp(x[idx])
        y[idx] = self.target_of(y[idx])
        return x, y


def as_batch(x: np.ndarray) -> np.ndarray:
    """A float32 copy of a batch ``(N, C, H, W)``: stamping works on it, never on the caller's array."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {x.shape}")
    return x


def _corner(size: int, h: int, w: int, position: str, margin: int) -> tuple[int, int]:
    rows = {"top": margin, "bottom": h - size - margin, "center": (h - size) // 2}
    cols = {"left": margin, "right": w - size - margin, "center": (w - size) // 2}
    if position == "center":
        return rows["center"], cols["center"]
    vert, horiz = position.split("-")
    return rows[vert], cols[horiz]


@dataclass
class BadNets(Attack):
    """A ``size`` x ``size`` patch pasted at a corner (Gu et al., 2017).

    The default pattern is a seeded random binary colour pattern, which is what makes it cheap to
    find for the model and distinctive for the defender.
    """

    target: int = 0
    size: int = 3
    position: str = "bottom-right"
    margin: int = 1
    seed: int = 0
    pattern: np.ndarray | None = None

    def _pattern(self, channels: int) -> np.ndarray:
        if self.pattern is not None:
            return np.asarray(self.pattern, dtype=np.float32)
        rng = np.random.default_rng(1000 + self.seed)
        p = (rng.random((channels, self.size, self.size)) > 0.5).astype(np.float32)
        p[:, 0, 0], p[:, -1, -1] = 1.0, 0.0  # never a flat patch
        return p

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The trigger's footprint ``(1, H, W)`` (1 where the patch sits)."""
        _, h, w = shape
        r, c = _corner(self.size, h, w, self.position, self.margin)
        m = np.zeros((1, h, w), dtype=np.float32)
        m[:, r:r + self.size, c:c + self.size] = 1
        return m

    def stamp(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32, copy=True)
        _, c, h, w = x.shape
        r, c0 = _corner(self.size, h, w, self.position, self.margin)
        x[:, :, r:r + self.size, c0:c0 + self.size] = self._pattern(c)
        return x


@dataclass
class Blended(Attack):
    """Blend a fixed seeded noise image into the whole input at opacity ``alpha`` (Chen et al., 2017)."""

    target: int = 0
    alpha: float = 0.15
    seed: int = 0

    def key(self, shape: tuple[int, int, int]) -> np.ndarray:
        rng = np.random.default_rng(2000 + self.seed)
        return rng.random(shape).astype(np.float32)

    def stamp(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return ((1 - self.alpha) * x + self.alpha * self.key(x.shape[1:])).astype(np.float32)
