"""SIG: a horizontal sinusoidal signal added to the whole image (Barni, Kallas and Tondi, ICIP 2019).

"A new backdoor attack in CNNs by training set corruption without label poisoning": the trigger is
``v(i, j) = delta * sin(2 * pi * j * f / W)`` added to every row and channel, then clipped to [0, 1].
The paper poisons only images of the target class and keeps their labels (a *clean-label* attack):
the network learns the signal as a shortcut to the target class because every target image that
carries it is correctly labelled. ``clean_label=False`` gives the dirty-label variant (stamp images
of other classes and relabel them), which learns faster on small data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import Attack, as_batch


@dataclass
class SIG(Attack):
    """Additive sinusoid of amplitude ``delta`` and ``frequency`` periods across the image width.

    The paper's values are ``delta = 20/255`` and ``f = 6`` on 32x32 images. The signal has no
    randomness; ``seed`` is kept so every attack takes the same fields (``poison`` takes its own seed).
    """

    target: int = 0
    delta: float = 20 / 255
    frequency: float = 6.0
    clean_label: bool = True
    seed: int = 0

    def signal(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The additive trigger ``(C, H, W)``: the same sinusoid along the width on every row and channel."""
        c, h, w = shape
        j = np.arange(w, dtype=np.float64)
        row = self.delta * np.sin(2 * np.pi * j * self.frequency / w)
        return np.broadcast_to(row.astype(np.float32), (c, h, w)).copy()

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Add the sinusoid to every image of the batch ``(N, C, H, W)`` and clip to [0, 1]."""
        x = as_batch(x)
        return np.clip(x + self.signal(x.shape[1:]), 0.0, 1.0)

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Clean-label (the paper): stamp ``rate * len(x)`` target-class images, labels unchanged.

        When the target class holds fewer images than that, all of them are stamped. With
        ``clean_label=False`` this is the base class's dirty-label poisoning.
        """
        if not self.clean_label:
            return super().poison(x, y, rate=rate, seed=seed)
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(y == self.target)
        k = min(len(cand), int(round(rate * len(x))))
        idx = np.sort(rng.choice(cand, size=k, replace=False))
        x = np.array(x, dtype=np.float32, copy=True)
        x[idx] = self.stamp(x[idx])
        return x, np.array(y, copy=True)
