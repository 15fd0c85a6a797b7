"""Unlearning driven by what fires the backdoor, not only where the reversal found it (``--method
combined``, the default when the profile names a suspect label).

Half of each batch carries a reversed trigger, where it was found (moved by up to 2 pixels) or its
footprint pasted anywhere (a globally pooled model fires wherever the pattern sits); every ``every``
epochs Neural Cleanse runs again on the partly purified model for the suspect labels, and what it
finds joins the triggers (several reversed triggers per label, each closer to what still fires); a
distillation term keeps clean predictions where they were. After every epoch the BatchNorm
statistics are re-estimated on the clean learning images (fine-tuning with frozen statistics moves
the convolutions under them). Beside the unlearning epochs, switching off the feature neurons the
reversed triggers raise most (in steps) is offered as a candidate: on BatchNorm models whose accuracy
a few hundred images of fine-tuning cannot hold, that is what stays within the bound. With no
suspect label there is nothing to unlearn and the method falls back to ANP's pruning.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.model import FeatureTap
from guard.purify.anp import ANPPruning
from guard.purify.base import Candidates, Purifier
from guard.purify.neurons import classifier_inputs_off
from guard.purify.triggers import stamp_batch
from guard.purify.tuning import finetune_epochs


class CombinedUnlearning(Purifier):
    """``--method combined``.

    Parameters
    ----------
    share
        Share of each batch stamped with a reversed trigger (at least 0.5 is used); 0.5.
    epochs, lr
        Unlearning epochs (Adam) and learning rate; None: three re-reversal rounds (``3 * every``),
        lr 1e-3.
    every
        Epochs between re-reversals of the suspect labels' triggers on the partly purified model; 4.
    distill
        Weight of the term that keeps clean predictions where the original model had them; 1.0.
    prune_share
        At most this share of the feature neurons is offered for switching off; 0.25.
    patience
        Unlearning stops after this many epochs in a row over the bound; 4.

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``); ``details_`` adds ``re_reversed_l1``.
    """

    method = "combined"

    def __init__(self, *, share: float = 0.5, epochs: int | None = None, lr: float = 1e-3, every: int = 4,
                 distill: float = 1.0, prune_share: float = 0.25, patience: int = 4, **kw):
        super().__init__(**kw)
        self.share = share
        self.epochs = epochs
        self.lr = lr
        self.every = every
        self.distill = distill
        self.prune_share = prune_share
        self.patience = patience

    def propose(self, model: nn.Module, c: Candidates) -> None:
        if not c.evidence:  # nothing reversed: only what ANP finds on clean data
            ANPPruning(max_drop=self.max_drop, seed=self.seed, progress=self.progress).propose(model, c)
            return
        self._prune_suspects(model, c)
        triggers, refresh = c.unlearning(every=self.every, seed=self.seed, device=self.device, progress=self.progress)
        tuned = finetune_epochs(model, c.x, c.y, epochs=self.epochs or 3 * self.every, seed=self.seed,
                                triggers=triggers, share=max(self.share, 0.5), lr=self.lr, distill=self.distill,
                                refresh=refresh, recalibrate=True, teacher_model=c.original, label="unlearn",
                                progress=self.progress)
        c.offer_epochs("unlearn", model, tuned, patience=self.patience)

    def _prune_suspects(self, model: nn.Module, c: Candidates) -> None:
        """Offer feature-layer pruning steps: the neurons the reversed triggers (where found and pasted
        anywhere) raise most over clean images, switched off in the classifier, a few more each step."""
        g = torch.Generator().manual_seed(self.seed)
        xs = torch.from_numpy(np.ascontiguousarray(c.x))
        with torch.no_grad(), FeatureTap(model) as tap:
            model(xs)
            clean = tap.features.mean(0)
            model(stamp_batch(xs, [t for _, t in c.scoring], 1.0, g))
            rank = torch.argsort(tap.features.mean(0) - clean, descending=True).numpy()
        step = max(1, len(rank) // 32)
        c.offer_steps("neurons", model, lambda m, n: classifier_inputs_off(m, rank[:n]),
                      range(step, int(self.prune_share * len(rank)) + 1, step))
