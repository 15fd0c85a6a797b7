"""Reconstructive Neuron Pruning (Li et al., ICML 2023): a purification that needs clean images only.

A backdoored network holds two kinds of neurons: the ones clean data needs and the few that carry
the backdoor. RNP separates them in two steps on a copy of the model, with no trigger and no
reversed trigger:

1. *Unlearn* (every weight): gradient ascent on the clean images' cross-entropy until the model's
   accuracy on them collapses. The backdoor is a ready path to a wrong label and clean images do not
   exercise its neurons, so it survives (the reference's log keeps 100% attack success throughout)
   and the unlearned model's errors land on the backdoor target.
2. *Recover* (one mask per neuron): on the unlearned weights, learn a mask in [0, 1] per neuron,
   multiplying its output, by gradient descent on the same cross-entropy (weights frozen, masks
   initialised at 1 and clipped to [0, 1] after every step). A mask can only scale a neuron, not
   undo what unlearning did to its weights; the cheapest way it wins clean accuracy back is to turn
   down the neurons that now send clean images to the target, and those carry the backdoor.

The mask is then read on the original model: :meth:`RNP.prune` switches off the lowest-mask neurons
(zeroed weights, :mod:`guard.purify.neurons`), all of them below a threshold or a few more at a time
as candidate states (``guard.purify.base`` offers them through its accuracy-bounded selection).

Reference settings (github.com/bboylyg/RNP, ``main.py``, its argparse defaults and ``README.md``),
kept here unless noted:

- unlearning: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, at most 20 epochs (the
  reference loops 0..20), learning rate divided by 10 at epochs 10 and 20 (``--schedule``); it stops
  once the accuracy counted over an epoch's batches, while they are being unlearned, is at most
  ``clean_threshold`` 0.20. The reference calls ``clip_grad_norm_(max_norm=20)`` before the backward
  pass, on gradients just zeroed, so it clips nothing: no clipping here either.
- recovering: SGD lr 0.2, momentum 0.9, on the masks only, 20 epochs, the loss scaled by ``alpha``
  0.2, masks clamped to [0, 1] after each step.
- pruning: by threshold, in steps of 0.05 up to 0.9 (``--pruning-by threshold``); its BadNets
  ResNet-18 log reaches 6.6% attack success at threshold 0.2 (24 of 4800 neurons pruned, 93.4% ->
  92.8% clean accuracy), hence the default threshold 0.2.
- data: 500 CIFAR-10 training images (``--ratio 0.01``); both phases run the model in train mode,
  so BatchNorm normalises with each batch's statistics.

Where this differs from the reference: the reference masks only BatchNorm layers, multiplying the
BN *weight* (``MaskBatchNorm2d``: ``gamma * m``, the shift kept) and prunes by zeroing that weight
alone. Here the mask multiplies the whole output of every neuron :func:`guard.purify.neurons.units`
enumerates (each conv output channel, through its BatchNorm when there is one, and each unit of a
hidden linear layer), so that models without BatchNorm have neurons to mask, and a mask at 0 is what
switching the neuron off (weights and shifts zeroed) does on the original model. Only BatchNorm
layers are put in train mode (batch statistics, as in the reference); dropout stays off, so the
accuracy that stops unlearning is not dropout noise. Masks that reach exactly 0 tie; ties keep the
layer order, as the reference's stable sort of its mask file does. Unlearning that diverges (a
non-finite loss or weight) is undone to the last finite state and stops; the reference has no guard.

Where it works (tests/purify/test_rnp.py, the real trigger on unseen images): on GapNet (BatchNorm,
global pooling, BadNets) unlearning sent the held-out images to the target on the model checked, as the
paper describes, and RNP's lowest masks fall on the backdoor's neurons, so a few pruned neurons remove
most of the attack at a few points of accuracy. Where it does not: on DemoNet (no normalisation) ascent
sends every image to a label that is not the target (or diverges with more images), the mask never wins
accuracy back and its lowest values fall on clean neurons, so RNP does not remove the backdoor; on the
attack zoo's width-8 ResNet-18 (BatchNorm) the order did not hold the backdoor either (figures:
docs/benchmarks.md, 'Measurements behind the defaults').
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


def _train_norms(net: nn.Module) -> None:
    """Eval mode except BatchNorm layers, which normalise with the batch's statistics (as the reference)."""
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


class RNP:
    """Unlearn, recover a neuron mask, prune by it: clean images only.

    ``fit(model, x, y)`` works on a copy and leaves the caller's model (weights, buffers, mode,
    ``requires_grad`` flags) untouched. Learned attributes: ``units_`` (layer names),
    ``mask_values_`` (one array per layer), ``order_`` ((layer index, channel) pairs, lowest mask
    first), ``values_`` (the masks in that order), ``unlearn_epochs_`` (epochs of gradient ascent
    run), ``unlearn_accuracy_`` (accuracy over the last unlearning epoch's batches),
    ``unlearn_history_`` and ``recover_history_`` (per-epoch accuracy over the batches), ``diverged_``
    (unlearning stopped at a step that made the loss or weights non-finite, undone), ``seconds_``.
    :meth:`prune` switches off the first ``n`` of ``order_`` on a model of the same architecture;
    :meth:`below` counts the neurons under a mask threshold.

    ``batch_size`` is the reference's 128: with a few hundred images that is two or three steps an
    epoch, and the epoch budgets are the reference's too.

    Parameters
    ----------
    unlearn_lr
        SGD learning rate of the unlearning (gradient ascent on every weight); the reference's 0.01.
    unlearn_epochs
        Unlearning epochs at most; the reference's 20.
    clean_threshold
        Unlearning stops once the accuracy over an epoch's batches is at most this; the reference's 0.2.
    milestones
        Unlearning epochs after which its learning rate is divided by 10; the reference's (10, 20).
    weight_decay
        Weight decay of the unlearning; the reference's 5e-4.
    momentum
        SGD momentum of both phases; the reference's 0.9.
    recover_lr
        SGD learning rate on the masks while recovering; the reference's 0.2.
    recover_epochs
        Recovering epochs; the reference's 20.
    alpha
        Scale of the recovering loss; the reference's 0.2.
    batch_size
        Images per step in both phases; the reference's 128.
    seed
        Seeds the batch order and torch's global generator for the fit.
    progress
        Progress bar on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).
    """

    def __init__(self, *, unlearn_lr: float = 0.01, unlearn_epochs: int = 20, clean_threshold: float = 0.2,
                 milestones: tuple[int, ...] = (10, 20), weight_decay: float = 5e-4, momentum: float = 0.9,
                 recover_lr: float = 0.2, recover_epochs: int = 20, alpha: float = 0.2, batch_size: int = 128,
                 seed: int = 0, progress: bool | None = None):
        self.unlearn_lr = unlearn_lr
        self.unlearn_epochs = unlearn_epochs
        self.clean_threshold = clean_threshold
        self.milestones = milestones
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.recover_lr = recover_lr
        self.recover_epochs = recover_epochs
        self.alpha = alpha
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray) -> RNP:
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64))
        net = copy.deepcopy(model)
        ce = nn.functional.cross_entropy
        with Progress("rnp", self.unlearn_epochs + self.recover_epochs, enabled=self.progress) as bar:
            self._unlearn(net, xt, yt, g, bar)
            bar.update(self.unlearn_epochs - self.unlearn_epochs_)
            # recover: the unlearned weights frozen, a mask per neuron trained to win clean accuracy back
            for p in net.parameters():
                p.requires_grad_(False)
            us = units(net)
            masked = MaskedUnits(us)  # without the adversary it multiplies each neuron's output by its mask
            opt = torch.optim.SGD(masked.masks, lr=self.recover_lr, momentum=self.momentum)
            self.recover_history_ = []
            _train_norms(net)
            with masked.attached():
                for _ in range(self.recover_epochs):
                    correct = seen = 0
                    for xb, yb in self._batches(xt, yt, g):
                        out = net(xb)
                        loss = self.alpha * ce(out, yb)
                        if not torch.isfinite(loss):  # a batch the unlearned weights overflow on teaches nothing
                            continue
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        with torch.no_grad():
                            for m in masked.masks:
                                m.clamp_(0, 1)
                        correct += int((out.argmax(1) == yb).sum())
                        seen += len(yb)
                    self.recover_history_.append(correct / max(seen, 1))
                    bar.update(1)
        self.units_ = [u.name for u in us]
        self.mask_values_, self.order_, self.values_ = mask_order(masked.masks)
        self.seconds_ = time.perf_counter() - t0
        return self

    def _batches(self, xt: torch.Tensor, yt: torch.Tensor, g: torch.Generator):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), self.batch_size):
            if i > 0 and len(xt) - i < 2:  # BatchNorm cannot normalise a batch of one image
                break
            idx = perm[i:i + self.batch_size]
            yield xt[idx], yt[idx]

    def _unlearn(self, net: nn.Module, xt: torch.Tensor, yt: torch.Tensor, g: torch.Generator, bar) -> None:
        """Gradient ascent on the clean cross-entropy, in place, until the accuracy counted over an
        epoch's batches is at most ``clean_threshold`` (or the epochs run out). Ascent on a network
        without normalisation can diverge: when a forward's loss or a step's weights are no longer
        finite, the last state whose loss was finite is put back and unlearning stops there."""
        params = list(net.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.unlearn_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(self.milestones), gamma=0.1)
        _train_norms(net)
        self.unlearn_history_ = []
        self.unlearn_epochs_ = 0
        self.diverged_ = False
        last_finite = None  # the state before the last forward whose loss was finite
        for epoch in range(1, self.unlearn_epochs + 1):
            correct = seen = 0
            for xb, yb in self._batches(xt, yt, g):
                snap = {k: v.detach().clone() for k, v in net.state_dict().items()}
                out = net(xb)
                loss = nn.functional.cross_entropy(out, yb)
                if not torch.isfinite(loss):
                    net.load_state_dict(last_finite if last_finite is not None else snap)
                    self.diverged_ = True
                    break
                last_finite = snap
                opt.zero_grad(set_to_none=True)
                (-loss).backward()
                opt.step()
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    net.load_state_dict(snap)
                    self.diverged_ = True
                    break
                correct += int((out.argmax(1) == yb).sum())
                seen += len(yb)
            sched.step()
            if seen:
                self.unlearn_history_.append(correct / seen)
            self.unlearn_epochs_ = epoch
            bar.update(1)
            if self.diverged_ or self.unlearn_history_[-1] <= self.clean_threshold:
                break
        self.unlearn_accuracy_ = self.unlearn_history_[-1] if self.unlearn_history_ else None

    def below(self, threshold: float) -> int:
        """How many neurons have a mask under ``threshold`` (the first that many of ``order_``)."""
        return int((self.values_ < threshold).sum())

    def prune(self, model: nn.Module, n: int) -> nn.Module:
        """Switch off the ``n`` neurons with the lowest masks in ``model`` (in place; same architecture)."""
        return switch_off(model, self.units_, self.order_[:n])


class RNPPruning(Purifier):
    """``--method rnp``: learn :class:`RNP`'s masks on the learning images, then offer switching off
    the lowest-mask neurons in steps (masks under ``threshold``, at most ``max_share`` of the neurons).
    Needs no reversed trigger; with none the most pruned state within the bound is kept.

    Parameters
    ----------
    threshold
        Only neurons whose mask is under this are offered for switching off; the reference's 0.2.
    max_share
        At most this share of the neurons is switched off; 0.1, twice ANP's, enough for the share of
        neurons the backdoor took on GapNet (docs/benchmarks.md, 'Measurements behind the defaults').

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``).
    """

    method = "rnp"

    def __init__(self, *, threshold: float = 0.2, max_share: float = 0.1, **kw):
        super().__init__(**kw)
        self.threshold = threshold
        self.max_share = max_share

    def propose(self, model: nn.Module, c: Candidates) -> None:
        est = RNP(seed=self.seed, progress=self.progress).fit(model, c.x, c.y)
        c.details["rnp"] = offer_mask_pruning("rnp", est, model, c, threshold=self.threshold,
                                              max_share=self.max_share) | {
            "unlearn_epochs": est.unlearn_epochs_, "unlearn_accuracy": est.unlearn_accuracy_}

    def fit(self, model, x, y, **kw) -> RNPPruning:
        super().fit(model, x, y, **kw)
        self.details_["rnp"]["pruned"] = pruned_count("rnp", self.selected_)
        return self
