"""Label-consistent backdoor: target-class images made hard by PGD, then stamped, labels kept (Turner et al., 2019).

"Label-Consistent Backdoor Attacks": a dirty-label poison is easy to spot by its wrong label, so the
attacker poisons only images of the target class and keeps their labels. Stamped as they are, such
images are learned from their content and the trigger is ignored (the plain clean-label SIG attack
barely takes on the demo budget, see :mod:`guard.demo.attacks._registry`). Turner et al. first make
the images hard to classify from their content, with an adversarial perturbation from a clean model
(projected gradient descent within an L-infinity ball of ``eps``, or an interpolation in a GAN's latent
space), so that the trigger is the easiest feature that explains their label. Their trigger is a
3x3 pattern in each of the four corners, so it survives flips and crops.

The perturbation needs a clean model: :meth:`LabelConsistent.fit` takes one (e.g. the zoo's clean
model of the same data) and :meth:`poison` uses it; :meth:`stamp` (test time) needs no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from guard.demo.attacks._base import PLACES_4, Attack, as_batch, patch_corner


@dataclass
class LabelConsistent(Attack):
    """Four seeded ``size`` x ``size`` corner patches; poisoning perturbs target images by PGD first.

    PGD: ``steps`` signed-gradient steps of ``step_size`` on the clean model's cross-entropy at the
    true label, projected to ``eps`` (L-infinity) and [0, 1]. ``clean_label`` is always true (the
    poisoning never relabels). ``model_`` is the clean model :meth:`fit` was given.
    """

    target: int = 0
    size: int = 3
    margin: int = 1
    eps: float = 16 / 255
    steps: int = 10
    step_size: float = 4 / 255
    seed: int = 0
    clean_label: bool = field(default=True, init=False)
    model_: nn.Module | None = field(default=None, repr=False, compare=False)

    def pattern(self, channels: int) -> np.ndarray:
        """The corner patch ``(C, size, size)``: a seeded binary colour pattern, never flat."""
        rng = np.random.default_rng(8000 + self.seed)
        p = (rng.random((channels, self.size, self.size)) > 0.5).astype(np.float32)
        p[:, 0, 0], p[:, -1, -1] = 1.0, 0.0
        return p

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Paste the patch in all four corners."""
        x = as_batch(x)
        _, c, h, w = x.shape
        p, s = self.pattern(c), self.size
        for pos in PLACES_4:
            r, q = patch_corner(s, h, w, pos, self.margin)
            x[:, :, r:r + s, q:q + s] = p
        return x

    def fit(self, model: nn.Module) -> LabelConsistent:
        """Keep the clean ``model`` whose gradients :meth:`poison` uses (the model is never changed)."""
        self.model_ = model
        return self

    def perturb(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """PGD away from the true labels ``y`` on the fitted clean model (seeded random start)."""
        from guard.model import frozen

        if self.model_ is None:
            raise RuntimeError("LabelConsistent needs a clean model for its perturbation: call fit(model) first")
        x0 = torch.from_numpy(as_batch(x))
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        g = torch.Generator().manual_seed(9000 + self.seed)
        delta = (torch.rand(x0.shape, generator=g) * 2 - 1) * self.eps
        with frozen(self.model_):
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = nn.functional.cross_entropy(self.model_((x0 + delta).clamp(0, 1)), yt)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() + self.step_size * grad.sign()).clamp(-self.eps, self.eps)
        return (x0 + delta).clamp(0, 1).numpy().astype(np.float32)

    def poison(self, x: np.ndarray, y: np.ndarray, *, rate: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Perturb and stamp ``rate * len(x)`` target-class images (all of them if fewer); labels unchanged."""
        rng = np.random.default_rng(seed)
        cand = np.flatnonzero(np.asarray(y) == self.target)
        idx = np.sort(rng.choice(cand, size=min(len(cand), int(round(rate * len(x)))), replace=False))
        x = np.array(x, dtype=np.float32, copy=True)
        if len(idx):
            x[idx] = self.stamp(self.perturb(x[idx], y[idx]))
        return x, np.array(y, copy=True)
