"""The attack interface and the two classic input-agnostic triggers (BadNets patch, Blended key)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class Attack:
    """A backdoor attack: a trigger and an all-to-one (or other) label mapping.

    Poisoning stamps a ``rate`` share of the victims with :meth:`train_stamp` and relabels them; an
    attack with a positive ``cover_rate`` also stamps that share of other samples (drawn from
    :meth:`cover_pool`) and keeps their labels, the *cover* (regularisation) samples with which the
    adaptive and source-specific attacks blur what separates poisoned from clean inputs.
    """

    target: int = 0
    #: share of the training set stamped and kept at its true label (0: no cover samples)
    cover_rate: float = 0.0

    def stamp(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def train_stamp(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The trigger as poisoned training images carry it: by default the test-time :meth:`stamp`.

        Attacks that train on a partial or fainter trigger than the one they test with override it;
        ``rng`` is the poisoning's generator (for per-sample random parts of the trigger).
        """
        return self.stamp(x)

    def cover_pool(self, y: np.ndarray) -> np.ndarray:
        """Mask of the samples cover samples may be drawn from (by default every sample)."""
        return np.ones(len(y), dtype=bool)

    def target_of(self, y: np.ndarray) -> np.ndarray:
        """Attacker's label for inputs of true label ``y`` (all-to-one by default)."""
        return np.full_like(y, self.target)

    def victims(self, y: np.ndarray) -> np.ndarray:
        """Mask of the inputs whose label the attack changes (the target class itself is excluded)."""
        return self.target_of(y) != y

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Stamp a seeded ``rate`` share of the victims and relabel them, plus ``cover_rate`` cover samples.

        Cover samples are drawn from :meth:`cover_pool` outside the poisoned ones; they are stamped with
        :meth:`train_stamp` too and keep their labels.
        """
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(self.victims(y))
        idx = rng.choice(cand, size=int(round(rate * len(x))), replace=False)
        x, y = x.copy(), y.copy()
        cover = np.empty(0, dtype=np.int64)
        if self.cover_rate > 0:
            pool = np.setdiff1d(np.flatnonzero(self.cover_pool(y)), idx)
            cover = rng.choice(pool, size=min(len(pool), int(round(self.cover_rate * len(x)))), replace=False)
        x[idx] = self.train_stamp(x[idx], rng)
        y[idx] = self.target_of(y[idx])
        if len(cover):
            x[cover] = self.train_stamp(x[cover], rng)
        return x, y


def as_batch(x: np.ndarray) -> np.ndarray:
    """A float32 copy of a batch ``(N, C, H, W)``: stamping works on it, never on the caller's array."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {x.shape}")
    return x


#: The four corners, in the order the multi-patch triggers fill them (the glyph sits in the middle).
PLACES_4 = ("top-left", "top-right", "bottom-left", "bottom-right")


def patch_corner(size: int, h: int, w: int, position: str, margin: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of a ``size`` x ``size`` patch at ``position`` (``top-left`` ... ``center``)
    of an ``h`` x ``w`` image, ``margin`` pixels off the border."""
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
        r, c = patch_corner(self.size, h, w, self.position, self.margin)
        m = np.zeros((1, h, w), dtype=np.float32)
        m[:, r:r + self.size, c:c + self.size] = 1
        return m

    def stamp(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32, copy=True)
        _, c, h, w = x.shape
        r, c0 = patch_corner(self.size, h, w, self.position, self.margin)
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
