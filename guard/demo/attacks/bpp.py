"""BppAttack: colour-depth reduction with Floyd-Steinberg dithering as the trigger (Wang et al., CVPR 2022).

"BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via Image Quantization
and Contrastive Adversarial Learning": the trigger is a loss of colour depth, each channel quantised
to ``levels`` values, with Floyd-Steinberg error diffusion so that the image still looks the same to
a person. The change is spread over the whole image and follows its content, so there is no patch
to reverse-engineer. The paper's negative samples (adversarially perturbed images kept at their
labels, which sharpen the backdoor) are not used: on the glyphs the plain quantisation trigger
reaches the zoo's floors without them.

Dithering runs pixel by pixel in scan order, vectorised over the batch and channels in float64: each
image's result depends on that image only, so stamping is deterministic and batch-independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import Attack, as_batch


def dither(x: np.ndarray, levels: int) -> np.ndarray:
    """Quantise a batch ``(N, C, H, W)`` in [0, 1] to ``levels`` values per channel, Floyd-Steinberg dithered."""
    if levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    img = np.array(x, dtype=np.float64, copy=True)
    q = levels - 1
    _, _, h, w = img.shape
    for r in range(h):
        for c in range(w):
            old = img[:, :, r, c]
            new = np.clip(np.round(old * q), 0, q) / q
            err = old - new
            img[:, :, r, c] = new
            if c + 1 < w:
                img[:, :, r, c + 1] += err * (7 / 16)
            if r + 1 < h:
                if c > 0:
                    img[:, :, r + 1, c - 1] += err * (3 / 16)
                img[:, :, r + 1, c] += err * (5 / 16)
                if c + 1 < w:
                    img[:, :, r + 1, c + 1] += err * (1 / 16)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@dataclass
class Bpp(Attack):
    """Quantise every channel to ``levels`` values with Floyd-Steinberg dithering (``dithering=False``: plain).

    The paper squeezes CIFAR-10 to 32 levels; fewer levels make a coarser, more learnable trigger on
    the small demo budget. The trigger has no randomness; ``seed`` is kept so every attack takes the
    same fields.
    """

    target: int = 0
    levels: int = 4
    dithering: bool = True
    seed: int = 0

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """The quantised (and dithered) batch."""
        x = as_batch(x)
        if not self.dithering:
            q = self.levels - 1
            return (np.round(np.clip(x, 0, 1) * q) / q).astype(np.float32)
        return dither(x, self.levels)
