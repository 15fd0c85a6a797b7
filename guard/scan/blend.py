"""Blend reversal: Neural Cleanse's question asked of whole-image triggers.

Neural Cleanse looks for the smallest *region* that carries every input to a label, so it finds
patch triggers and misses blended ones (Chen et al., 2017), whose key covers the whole image at a
low opacity. This scan asks the blended question instead: for each label k and a grid of increasing
opacities alpha, it optimises one full-image pattern p_k (tanh box constraint, Adam, every label in
one batched problem through :func:`~guard.scan.trigger.stamp_all` with a constant mask; each opacity
starts from the previous one's patterns) so that ``(1 - alpha) x + alpha p_k`` is classified k, and measures the
attack success on held-out clean images of the other classes. From that curve it reads the opacity
each label needs for half of them (interpolated on the grid). On a clean model the labels need about
the same opacity (they rise together as alpha grows); the target of a blended backdoor gets there
with clearly less. A label's *lead* is the share of opacity it saves over the easiest other label
(``1 - alpha_k / min_{j != k} alpha_j``); a label whose lead is over ``threshold`` is suspect.

The bar, 0.175, was set on the calibration population of ``tests/scan/blend_calibration.py`` (36 glyph
models, seeds disjoint from the test population): midway between the clean models' largest leads and
the blended ones' (the blended models' largest lead was their target every time). A few patch models'
targets also led, below the bar; the rest stayed in the pack, which is Neural Cleanse's and DF-TND's
ground. The grid starts at 0.01: on the less robust layouts (a width-8 ResNet-18, an all-convolutional
net) a blended target is reached below 0.02, and a grid that starts higher floors it beside the natural
labels it should lead. A scan of a 10-class glyph model takes seconds on two cores (figures:
docs/benchmarks.md, 'Measurements behind the defaults', where the false alarms this bar still gives on
those layouts' clean models are measured).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from guard._progress import Progress
from guard.model import frozen
from guard.scan.reversal import crossing, leads, reversal_data
from guard.scan.trigger import from_raw, stamp_all

ALPHAS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2)
"""The default opacity grid: from 0.01, where a blended backdoor's target on a less robust layout is already
reached, to 0.2, where a robust model's natural labels are."""


class BlendReversal:
    """Reverse-engineer a blended trigger per label at fixed opacities and flag a label that leads.

    Parameters
    ----------
    alphas
        The opacity grid the success curve is read on (increasing, each in (0, 1)); :data:`ALPHAS`, 0.01
        to 0.2. A label that needs more than the last is censored there, less than the first floored.
    steps
        Adam steps at the first opacity; 60.
    refine_steps
        Adam steps at each later opacity, which starts from the previous one's patterns; 20.
    batch_size
        Images each label's pattern is blended into per step; 16.
    lr
        Adam's learning rate on the raw (tanh) patterns; 0.1.
    n_fit
        Clean images the patterns are optimised on, at most (and at most a third of ``x``); 100.
    n_eval
        Held-out clean images the success is measured on, at most; 300.
    success
        Share of the held-out images of other classes a label must reach: its needed opacity is where
        its success first crosses this; 0.5 (half of them).
    threshold
        A label whose lead is over this is suspect; 0.175, midway between the clean and the blended
        models of the calibration population (docs/benchmarks.md, 'Measurements behind the defaults').
    seed
        Seeds the fit/held-out split, the batches and thus the patterns.
    progress
        Progress bar on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).

    Learned attributes: ``attack_success_`` (A, K) success of each label's pattern at each opacity
    of ``alphas``, ``alpha_needed_`` (K,) the opacity each label needs for ``success`` of it
    (censored at the last opacity), ``lead_`` (K,) the share of opacity it saves over the easiest other
    label, ``patterns_`` (K, C, H, W) each label's pattern at the grid opacity nearest its need,
    ``opacity_`` (K,) that grid opacity (the one to stamp ``patterns_`` at), ``suspect_labels_``,
    ``steps_``, ``seconds_``.
    """

    def __init__(self, *, alphas: Sequence[float] = ALPHAS,
                 steps: int = 60, refine_steps: int = 20, batch_size: int = 16, lr: float = 0.1,
                 n_fit: int = 100, n_eval: int = 300, success: float = 0.5, threshold: float = 0.175,
                 seed: int = 0, progress: bool | None = None):
        self.alphas = alphas
        self.steps = steps
        self.refine_steps = refine_steps
        self.success = success
        self.batch_size = batch_size
        self.lr = lr
        self.n_fit = n_fit
        self.n_eval = n_eval
        self.threshold = threshold
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray | None = None,
            num_classes: int | None = None) -> BlendReversal:
        """Optimise every label's pattern at every opacity on clean ``x`` (N, C, H, W) in [0, 1].

        ``y`` (the clean labels) decides which held-out images count for a label's success (those of
        other classes); without it the model's own predictions do.
        """
        t0 = time.perf_counter()
        alphas = [float(a) for a in self.alphas]
        if not alphas or any(not 0.0 < a < 1.0 for a in alphas) or alphas != sorted(set(alphas)):
            raise ValueError(f"alphas must be increasing opacities in (0, 1), got {self.alphas!r}")
        fit_x, eval_x, eval_y, k = reversal_data(model, x, y, n_fit=self.n_fit, n_eval=self.n_eval, seed=self.seed,
                                                 num_classes=num_classes)
        gen = torch.Generator().manual_seed(self.seed)
        shape = tuple(x.shape[1:])
        with frozen(model), Progress("blend", self._total_steps(len(alphas)), enabled=self.progress) as bar:
            target = torch.arange(k).repeat_interleave(self.batch_size)
            success = np.zeros((len(alphas), k))
            patterns = np.zeros((len(alphas), k, *shape), dtype=np.float32)
            # one pattern per label, carried from each opacity to the next (warm start): the first
            # opacity gets ``steps``, each later one ``refine_steps``
            raw = torch.zeros((k, *shape), requires_grad=True)
            opt = torch.optim.Adam([raw], lr=self.lr)
            for a_i, alpha in enumerate(alphas):
                masks = torch.full((k, 1, *shape[1:]), alpha)
                for _ in range(self.steps if a_i == 0 else self.refine_steps):
                    batch = fit_x[torch.randint(0, len(fit_x), (self.batch_size,), generator=gen)]
                    loss = nn.functional.cross_entropy(model(stamp_all(batch, masks, from_raw(raw))), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                with torch.no_grad():
                    pat = from_raw(raw)
                    patterns[a_i] = pat.numpy()
                    for label in range(k):
                        others = eval_y != label
                        if not others.any():
                            continue
                        pred = model((1 - alpha) * eval_x[others] + alpha * pat[label]).argmax(1)
                        success[a_i, label] = float((pred == label).float().mean())
        self.attack_success_ = success
        self.alpha_needed_ = crossing(np.asarray(alphas), success, self.success)
        nearest = np.abs(np.asarray(alphas)[:, None] - self.alpha_needed_[None]).argmin(0)
        self.patterns_ = patterns[nearest, np.arange(k)]
        self.opacity_ = np.asarray(alphas, dtype=np.float32)[nearest]
        self._decide()
        self.steps_ = self._total_steps(len(alphas))
        self.seconds_ = time.perf_counter() - t0
        return self

    def _decide(self) -> None:
        """``lead_`` and ``suspect_labels_`` from ``alpha_needed_``: a label's lead is the share of opacity
        it saves over the easiest *other* label (about 0 for the pack, > 0 for a label ahead of it)."""
        self.lead_ = leads(self.alpha_needed_)
        self.suspect_labels_ = [int(j) for j in np.flatnonzero(self.lead_ > self.threshold)]

    def _total_steps(self, n_alphas: int) -> int:
        return self.steps + (n_alphas - 1) * self.refine_steps

    def per_label(self) -> list[dict]:
        """One JSON-ready record per label."""
        return [{"label": j, "lead": round(float(self.lead_[j]), 4), "alpha": round(float(self.alpha_needed_[j]), 4),
                 "attack_success": {f"{a:g}": round(float(self.attack_success_[i, j]), 4)
                                    for i, a in enumerate(self.alphas)},
                 "suspect": j in self.suspect_labels_} for j in range(len(self.lead_))]


def blend_keys(model: nn.Module, x: np.ndarray, y: np.ndarray, labels: Sequence[int], *, alpha: float,
               steps: int = 200, lr: float = 0.1, batch_size: int = 64, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """The blend question for a few ``labels`` at one opacity: for each, the full-image pattern ``p`` that
    sends ``(1 - alpha) x + alpha p`` to it, optimised on the clean ``x`` of other classes (labels ``y``).

    Returns the patterns ``(n, C, H, W)`` and each one's success on those images. A purification asks it
    again of the model it is tuning (:meth:`guard.purify.base.Candidates.rereverse`): once the key found
    by the scan is unlearned, what key still carries images to the suspect label."""
    patterns = np.zeros((len(labels), *x.shape[1:]), dtype=np.float32)
    success = np.zeros(len(labels))
    gen = torch.Generator().manual_seed(seed)
    with frozen(model):
        for i, label in enumerate(labels):
            others = torch.from_numpy(np.ascontiguousarray(x[np.asarray(y) != label], dtype=np.float32))
            if not len(others):
                continue
            raw = torch.zeros((1, *x.shape[1:]), requires_grad=True)
            opt = torch.optim.Adam([raw], lr=lr)
            target = torch.full((batch_size,), int(label), dtype=torch.long)
            for _ in range(steps):
                batch = others[torch.randint(0, len(others), (batch_size,), generator=gen)]
                loss = nn.functional.cross_entropy(model((1 - alpha) * batch + alpha * from_raw(raw)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                key = from_raw(raw)
                patterns[i] = key[0].numpy()
                success[i] = float((model((1 - alpha) * others + alpha * key).argmax(1) == label).float().mean())
    return patterns, success
