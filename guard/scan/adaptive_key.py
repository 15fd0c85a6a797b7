"""The scan's own adaptive attacker: a blend key that reaches a suspect label while looking clean at every layer.

The reversed triggers tell the scan which checks see the backdoor's route; they do not tell it which
checks still see it once an attacker who knows guard adapts its trigger. That attacker (the bench's
gray-box one, :mod:`guard.bench.graybox`) has the weights and its own images and re-optimises its key to
keep the target label while matching clean target-class statistics at every layer; against it the checks
that look at the head's features in aggregate fade first and the ones that keep seeing it are few, and
which ones differs between networks. The defender has what that attacker has (the weights, clean images
of its own), so the scan plays it: :class:`AdaptiveKey` optimises a full-image blend key at a fixed
opacity, from seeded noise, with Adam on the scan's clean images of other labels: cross-entropy to the
suspect label plus ``weight`` times the moment mismatch of :mod:`guard.scan.moments` (relative to the
starting key's, so one weight means the same trade on every network). The clean images it stamps and
that reach the label are inputs that an adapted trigger would send; how often each check sees them
weights the ensemble (:func:`guard.online.ensemble.separation_weights`, ``adaptive``).

The key is the defender's stand-in, not the attacker's trigger: it shows which checks survive the
adaptation on *this* network, not what the real trigger looks like (figures: docs/benchmarks.md,
'The scan's own adaptive attacker').
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.model import frozen, predict
from guard.scan.moments import LayerStatistics, clean_moments, moment_loss


class AdaptiveKey:
    """A blend key at opacity ``alpha`` optimised to send clean images to one label with clean-looking layers.

    ``fit(model, x, y, label)`` optimises the key on clean ``(x, y)``: the images of ``label`` give the clean
    moments to match, the others are stamped in batches; ``stamp(x)`` blends the key into images and
    ``success_`` is the share of the other labels' images that the stamped key sends to ``label``.

    Parameters
    ----------
    alpha
        Opacity of the blend, in (0, 1); 0.15 is Adap-Blend's training opacity, in the range blended
        backdoors use.
    weight
        Weight of the moment mismatch relative to the cross-entropy, measured relative to the starting
        key's mismatch; 10 is the bench's strongest gray-box budget.
    steps, lr, batch_size
        Adam's budget, step size and batch (the bench's gray-box attacker's: 300, 0.05, 32).
    seed
        Seeds the starting key and the batches.

    Attributes
    ----------
    key_
        ``(C, H, W)`` float32 in [0, 1], the optimised key.
    label_
        The label it was optimised for.
    reached_
        ``(M,)`` bool over the ``M`` clean images of other labels (in ``x``'s order): whether the stamped key
        sends each to ``label_``.
    success_
        Share of the clean images of other labels that the stamped key sends to ``label_`` (``reached_``'s mean).
    layers_
        How many layers' moments it matched.
    matching_loss_
        ``(first, last)`` moment mismatch over the optimisation.
    """

    def __init__(self, *, alpha: float = 0.15, weight: float = 10.0, steps: int = 300, lr: float = 0.05,
                 batch_size: int = 32, seed: int = 0):
        self.alpha = alpha
        self.weight = weight
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed

    def _validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.weight < 0 or self.lr <= 0:
            raise ValueError(f"weight must be >= 0 and lr > 0, got {self.weight}, {self.lr}")
        if int(self.steps) < 1 or int(self.batch_size) < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray, label: int) -> AdaptiveKey:
        """Optimise the key on clean ``(x, y)`` for ``label``; ValueError without 2 images of ``label`` and
        2 of other labels. ``model`` keeps its weights, gradient flags and mode."""
        self._validate()
        y = np.asarray(y)
        own = y == int(label)
        if own.sum() < 2 or (~own).sum() < 2:
            raise ValueError(f"the adaptive key for label {label} needs 2 clean images of it and 2 of other labels")
        shape = tuple(int(s) for s in x.shape[1:])
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)
        victims, targets = xt[torch.from_numpy(~own).to(device)], xt[torch.from_numpy(own).to(device)]
        start = np.random.default_rng(self.seed).uniform(0.01, 0.99, shape).astype(np.float32)
        theta = nn.Parameter(torch.from_numpy(np.log(start / (1 - start))).to(device))  # key = sigmoid(theta)
        opt = torch.optim.Adam([theta], lr=float(self.lr))
        gen = torch.Generator().manual_seed(int(self.seed))
        n = min(int(self.batch_size), len(victims))
        yt = torch.full((n,), int(label), dtype=torch.long, device=device)
        stats = LayerStatistics(model, shape)
        losses: list[float] = []
        with frozen(model), stats.hooked():
            moments = clean_moments(stats, targets)
            for _ in range(int(self.steps)):
                pick = torch.randint(0, len(victims), (n,), generator=gen).to(device)
                logits, pooled = stats.capture((1 - self.alpha) * victims[pick] + self.alpha * torch.sigmoid(theta))
                match = moment_loss(pooled, moments)
                scale = losses[0] if losses else float(match.detach())  # the starting key's mismatch
                loss = nn.functional.cross_entropy(logits, yt) + self.weight * match / max(scale, 1e-6)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(match.detach()))
            self.layers_ = len(moments)
        self.key_ = torch.sigmoid(theta.detach()).cpu().numpy().astype(np.float32)
        self.label_ = int(label)
        self.matching_loss_ = (losses[0], losses[-1])
        with frozen(model):
            self.reached_ = predict(model, self.stamp(x[~own])) == self.label_
        self.success_ = float(self.reached_.mean())
        return self

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the key blended in at ``alpha``, float32 in [0, 1]."""
        return ((1 - self.alpha) * np.asarray(x, dtype=np.float32) + self.alpha * self.key_).astype(np.float32)


def adaptive_stamped(model: nn.Module, x: np.ndarray, y: np.ndarray, labels: list[int], *, steps: int,
                     seed: int = 0) -> tuple[np.ndarray, list[AdaptiveKey]]:
    """Clean images of other labels stamped with an :class:`AdaptiveKey` for each of ``labels`` (those with
    2 clean images of their own and 2 of others), kept where the model predicts the key's label; and the keys."""
    keys, parts = [], []
    y = np.asarray(y)
    for lab in labels:
        own = y == int(lab)
        if own.sum() < 2 or (~own).sum() < 2:
            continue
        key = AdaptiveKey(steps=steps, seed=seed).fit(model, x, y, int(lab))
        parts.append(key.stamp(x[~own][key.reached_]))
        keys.append(key)
    shape = (0, *x.shape[1:])
    return (np.concatenate(parts) if parts else np.zeros(shape, np.float32)), keys
