"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Backdoor neurons are the ones whose small perturbation most easily breaks a model on clean data: a
backdoored network sits close to a state that answers the target label everywhere. ANP learns a mask
``m`` in [0, 1] per neuron on clean data, under an adversary that scales each neuron's weight and
bias by ``1 + delta`` (``|delta| <= eps``) to maximise the loss; the objective is
``alpha * loss(m, 0) + (1 - alpha) * loss(m, delta*)``. The neurons the mask drives lowest are the
ones that only robustness to the adversary needs switched off, and they are pruned.

Here a neuron is an output channel of each conv (of the BatchNorm after it, when there is one) and each
unit of a hidden linear layer (:mod:`guard.purify.neurons`); the perturbation and the mask act through
forward hooks during the optimisation only, and pruning writes zeros into the weights. The paper's
settings are kept (eps 0.4, one adversarial step of size 0.2, alpha 0.2, SGD lr 0.2 momentum 0.9 on
the masks); it used 2000 iterations on 1% of CIFAR-10, a budget scaled here to the data at hand.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from guard._progress import Progress
from guard.purify.base import Candidates, Purifier, offer_mask_pruning, pruned_count
from guard.purify.neurons import MaskedUnits, mask_order, switch_off, units


class ANP:
    """Learn per-neuron masks under adversarial neuron perturbation on clean data.

    ``fit(model, x, y)`` leaves the caller's model untouched. Learned attributes: ``units_`` (layer
    names), ``mask_values_`` (one array per layer), ``order_`` ((layer index, channel) pairs, lowest
    mask first), ``seconds_``. :meth:`prune` switches off the first ``n`` of ``order_`` on a model.

    Parameters
    ----------
    eps
        Bound on the adversary's relative perturbation of each neuron's weight and bias
        (``|delta| <= eps``); the paper's 0.4.
    step
        Size of the adversary's one signed-gradient step from its random start; the paper's 0.2.
    alpha
        Weight of the natural loss against the perturbed one in the mask's objective; the paper's 0.2.
    lr
        SGD learning rate on the masks (momentum 0.9); the paper's 0.2.
    iterations
        Mask updates; 100, the paper's 2000 iterations on 1% of CIFAR-10 scaled to a few hundred images.
    batch_size
        Clean images per update (all of them when fewer); 32.
    seed
        Seeds the batches and the adversary's random starts.
    progress
        Progress bar on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).
    """

    def __init__(self, *, eps: float = 0.4, step: float = 0.2, alpha: float = 0.2, lr: float = 0.2,
                 iterations: int = 100, batch_size: int = 32, seed: int = 0, progress: bool | None = None):
        self.eps = eps
        self.step = step
        self.alpha = alpha
        self.lr = lr
        self.iterations = iterations
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> ANP:
        t0 = time.perf_counter()
        net = copy.deepcopy(model).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        us = units(net)
        pert = MaskedUnits(us)
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
        opt = torch.optim.SGD(pert.masks, lr=self.lr, momentum=0.9)
        ce = nn.functional.cross_entropy
        with pert.attached(), Progress("anp", self.iterations, enabled=self.progress) as bar:
            for _ in range(self.iterations):
                idx = torch.randint(0, len(xt), (min(self.batch_size, len(xt)),), generator=g)
                xb, yb = xt[idx], yt[idx]
                # the adversary: random start in the eps-ball, one signed-gradient ascent step
                for d in pert.dw + pert.db:
                    with torch.no_grad():
                        d.uniform_(-self.eps, self.eps, generator=g)
                pert.adversary = True
                loss = -ce(net(xb), yb)
                grads = torch.autograd.grad(loss, pert.dw + pert.db)
                with torch.no_grad():
                    for d, gr in zip(pert.dw + pert.db, grads):
                        d.sub_(self.step * gr.sign()).clamp_(-self.eps, self.eps)
                # the mask: natural loss plus the loss under the perturbation found
                pert.adversary = True
                rob = ce(net(xb), yb)
                pert.adversary = False
                nat = ce(net(xb), yb)
                loss = self.alpha * nat + (1 - self.alpha) * rob
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in pert.masks:
                        m.clamp_(0, 1)
                bar.update(1)
        self.units_ = [u.name for u in us]
        self.mask_values_, self.order_, self.values_ = mask_order(pert.masks)
        self.seconds_ = time.perf_counter() - t0
        return self

    def prune(self, model: nn.Module, n: int) -> nn.Module:
        """Switch off the ``n`` neurons with the lowest masks in ``model`` (in place; same architecture)."""
        return switch_off(model, self.units_, self.order_[:n])


class ANPPruning(Purifier):
    """``--method anp``: learn :class:`ANP`'s masks on the learning images, then offer switching off
    the lowest-mask neurons in steps (masks under ``threshold``, at most ``max_share`` of the neurons)
    to the accuracy-bounded selection. Clean images only; reversed triggers, when the profile has
    them, only score the candidates.

    Parameters
    ----------
    threshold
        Only neurons whose mask is under this are offered for switching off; 0.2.
    max_share
        At most this share of the neurons is switched off; 0.05 (RNP's 0.1 is twice it).
    iterations
        :class:`ANP`'s mask updates; 100.

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``).
    """

    method = "anp"

    def __init__(self, *, threshold: float = 0.2, max_share: float = 0.05, iterations: int = 100, **kw):
        super().__init__(**kw)
        self.threshold = threshold
        self.max_share = max_share
        self.iterations = iterations

    def propose(self, model: nn.Module, c: Candidates) -> None:
        est = ANP(iterations=self.iterations, seed=self.seed, progress=self.progress).fit(model, c.x, c.y)
        c.details["anp"] = offer_mask_pruning("anp", est, model, c, threshold=self.threshold,
                                              max_share=self.max_share)

    def fit(self, model, x, y, **kw) -> ANPPruning:
        super().fit(model, x, y, **kw)
        self.details_["anp"]["pruned"] = pruned_count("anp", self.selected_)
        return self
