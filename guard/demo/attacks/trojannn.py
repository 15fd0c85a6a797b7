"""TrojanNN: a patch optimised to excite chosen internal neurons (Liu et al., NDSS 2018).

"Trojaning Attack on Neural Networks": instead of an arbitrary pattern, the attacker reverse-engineers
the trigger from a pre-trained model. It picks a few neurons of an internal layer that the trigger
region can drive strongly, optimises the pixels inside a fixed mask so that those neurons fire far
above their normal range, and then retrains the model on data stamped with that trigger and
relabelled to the target. The backdoor rides on features the network already has, so it is learned
quickly and with little loss of clean accuracy.

Here the layer is the model's feature layer (the input of its last ``nn.Linear``, tapped with
:class:`guard.model.FeatureTap`, or the layer named by ``feature_layer``). The paper selects neurons
with the strongest connections from the previous layer; that needs to know which module feeds the
layer, so this implementation uses a generic, derivative-free measure of "easy to drive from the
trigger": the neurons whose activation varies most when random patterns fill the trigger region
(standard deviation over the patterns, averaged over clean images). Retraining (fine-tuning the
clean model on poisoned data) belongs to the caller, e.g. :func:`guard.demo.attacks.zoo.train_backdoored`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from guard.demo.attacks._base import Attack, as_batch, patch_corner


@dataclass
class TrojanNN(Attack):
    """A ``size`` x ``size`` patch at ``position`` whose pattern :meth:`fit` optimises on a clean model.

    ``n_neurons`` neurons are selected by their response to ``n_probes`` random patterns; then
    ``steps`` Adam steps at ``lr`` on a sigmoid-parametrised pattern maximise their mean activation
    over ``batch`` clean images (everything seeded by ``seed``).
    After fitting, ``pattern_`` holds the pattern ``(C, size, size)`` in [0, 1] and ``neurons_`` the
    selected feature indices; :meth:`stamp` needs a fitted attack.
    """

    target: int = 0
    size: int = 5
    position: str = "bottom-right"
    margin: int = 1
    n_neurons: int = 2
    n_probes: int = 8
    steps: int = 100
    lr: float = 0.1
    batch: int = 32
    feature_layer: str | None = None
    seed: int = 0
    pattern_: np.ndarray | None = field(default=None, repr=False)
    neurons_: np.ndarray | None = field(default=None, repr=False)

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The trigger's footprint ``(1, H, W)`` (1 where the patch sits)."""
        _, h, w = shape
        r, c = patch_corner(self.size, h, w, self.position, self.margin)
        m = np.zeros((1, h, w), dtype=np.float32)
        m[:, r:r + self.size, c:c + self.size] = 1
        return m

    def fit(self, model: nn.Module, x: np.ndarray) -> TrojanNN:
        """Select neurons of ``model``'s feature layer and optimise the patch to excite them.

        ``model`` is a pre-trained clean model; it is left unchanged (weights, mode, hooks and
        ``requires_grad`` flags). ``x`` is a few clean images ``(N, C, H, W)`` in [0, 1].
        """
        from guard.model import FeatureTap, frozen

        x = as_batch(x)
        gen = torch.Generator().manual_seed(4000 + self.seed)
        pick = torch.randperm(len(x), generator=gen)[: self.batch]
        xb = torch.from_numpy(x[pick.numpy()])
        c, h, w = xb.shape[1:]
        r, q = patch_corner(self.size, h, w, self.position, self.margin)
        m = torch.from_numpy(self.mask((c, h, w)))

        def paste(p: torch.Tensor) -> torch.Tensor:
            full = torch.zeros(1, c, h, w, dtype=p.dtype)
            full[..., r:r + self.size, q:q + self.size] = p
            return xb * (1 - m) + full * m

        with frozen(model), FeatureTap(model, self.feature_layer) as tap:
            # neuron selection: the neurons that the trigger pixels move most, i.e. the spread of
            # their activation over random patterns in the trigger region, averaged over the images
            with torch.no_grad():
                acts = []
                for p in torch.rand(self.n_probes, c, self.size, self.size, generator=gen):
                    model(paste(p))
                    assert tap.features is not None
                    acts.append(tap.features)
                score = torch.stack(acts).std(0).mean(0)
                neurons = torch.argsort(score, descending=True, stable=True)[: self.n_neurons]
            # pattern optimisation: maximise the selected neurons' mean activation
            raw = torch.randn(c, self.size, self.size, generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([raw], lr=self.lr)
            for _ in range(self.steps):
                model(paste(torch.sigmoid(raw)))
                loss = -tap.features[:, neurons].mean()  # type: ignore[index]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        self.pattern_ = torch.sigmoid(raw).detach().numpy().astype(np.float32)
        self.neurons_ = np.sort(neurons.numpy()).astype(np.int64)
        return self

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Paste the fitted patch on every image of the batch."""
        if self.pattern_ is None:
            raise RuntimeError("TrojanNN.stamp needs a fitted pattern: call fit(model, x) first")
        x = as_batch(x)
        _, _, h, w = x.shape
        r, c0 = patch_corner(self.size, h, w, self.position, self.margin)
        x[:, :, r:r + self.size, c0:c0 + self.size] = self.pattern_
        return x
