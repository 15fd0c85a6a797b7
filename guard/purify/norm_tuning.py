"""BatchNorm-aware tuning: purify by training only what a few hundred images can move without breaking the
network, so that a BatchNorm model does not lose points to the fine-tuning itself.

Full fine-tuning on a few hundred clean images moves every convolution under BatchNorm statistics that
were estimated on the training set; the statistics no longer describe what the layers output and clean
accuracy falls. Here the trained parameters are the normalisation layers' affine parameters and the last
``tail`` layers with weights (the classifier and the layers before it); the running statistics are
re-estimated on the clean images first (a candidate of its own) and after every epoch, and training runs
with batch statistics (in train mode), which normalise the gradients that frozen statistics leave
unnormalised. The unlearning signal is the profile's reversed triggers (where found and pasted anywhere,
half of each batch, at their true labels), joined every ``every`` epochs by triggers reversed again on
the partly purified model (a backdoor with several triggers, as Adap-Patch's, keeps firing from the ones
the first reversal did not find), and, with ``adversarial`` (the default when the profile names no
suspect label), the shared adversarial images of :mod:`guard.purify.sau`; a distillation term keeps
clean predictions where the original model had them. On a model without BatchNorm it tunes the tail:
leaving the first layers as they are is what keeps a few hundred images from eroding what the model
learned from its training set.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from guard.purify.base import Candidates, Purifier
from guard.purify.sau import SharedAdversarialUnlearning
from guard.purify.tuning import finetune_epochs, norm_layers, recalibrate_norms


def tuned_parameters(model: nn.Module, *, tail: int | None) -> list[nn.Parameter]:
    """Normalisation layers' affine parameters and every parameter of the last ``tail`` modules that
    hold weights (in module order; None: every one), each once."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    chosen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, norm_types):
            for p in m.parameters(recurse=False):
                chosen[id(p)] = p
    weighted = [m for m in model.modules()
                if not isinstance(m, norm_types) and any(True for _ in m.parameters(recurse=False))]
    for m in weighted if tail is None else weighted[-tail:] if tail > 0 else []:
        for p in m.parameters(recurse=False):
            chosen[id(p)] = p
    return list(chosen.values())


class NormTuning(Purifier):
    """``--method bn-tune``.

    Parameters
    ----------
    tail
        How many of the last layers with weights are trained besides the normalisation layers (None: every
        one); 4.
    body
        The layers before the tail are trained too, at this fraction of ``lr`` (0: left as trained); 0.
    share
        Share of each batch stamped with a reversed trigger (when the profile has one); 0.5.
    every
        Epochs between re-reversals of the suspect labels' triggers on the partly purified model (0:
        only the profile's triggers); 5.
    adversarial
        Add SAU's shared adversarial images (None: only when the profile names no suspect label).
    distill
        Weight of the term that keeps clean predictions where the original model had them; 1.0.
    epochs, lr, batch_size
        The fine-tuning (Adam): None epochs is 20, lr 2e-3, batches of 32.
    patience
        Tuning stops after this many epochs in a row over the bound; 4.
    batch_stats
        Train in train mode: BatchNorm normalises each batch with its own statistics (re-estimated on
        the clean images after every epoch). False keeps the running statistics while training, which
        leaves the gradients unnormalised, and on a BatchNorm GapNet a single epoch that way cost many
        points of clean accuracy (figures: docs/benchmarks.md, 'Measurements behind the defaults').
    lead
        With several suspect labels, the cheapest evidence is unlearned first and a label joins once its
        latest reversed trigger costs at most ``lead`` times the cheapest one's
        (:meth:`~guard.purify.base.Candidates.unlearning`); None unlearns every suspect label from the
        first epoch. 1.5.

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``).
    """

    method = "bn-tune"

    def __init__(self, *, tail: int | None = 4, body: float = 0.0, share: float = 0.5, every: int = 5,
                 adversarial: bool | None = None, distill: float = 1.0, epochs: int | None = None,
                 lr: float = 2e-3, batch_size: int = 32, patience: int = 4, batch_stats: bool = True,
                 lead: float | None = 1.5, **kw):
        super().__init__(**kw)
        self.tail = tail
        self.body = body
        self.share = share
        self.every = every
        self.adversarial = adversarial
        self.distill = distill
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patience = patience
        self.batch_stats = batch_stats
        self.lead = lead

    def propose(self, model: nn.Module, c: Candidates) -> None:
        norms = bool(norm_layers(model))
        if norms:
            recalibrate_norms(model, c.x)
            c.offer("recalibrate", model)
        triggers, refresh = c.unlearning(every=self.every, lead=self.lead, seed=self.seed, device=self.device,
                                         progress=self.progress)
        adversarial = self.adversarial if self.adversarial is not None else not triggers
        extra = None
        if adversarial:
            sau = SharedAdversarialUnlearning(seed=self.seed)
            extra = sau.adversarial_loss(copy.deepcopy(c.original).eval(), torch.Generator().manual_seed(self.seed + 1))
        params = tuned_parameters(model, tail=self.tail)
        groups = [{"params": params}]
        if self.body > 0:  # the layers before the tail, at a fraction of the rate
            chosen = {id(p) for p in params}
            rest = [p for p in model.parameters() if id(p) not in chosen]
            if rest:
                groups.append({"params": rest, "lr": self.lr * self.body})
        tuned = finetune_epochs(model, c.x, c.y, epochs=self.epochs or 20, lr=self.lr, batch_size=self.batch_size,
                                seed=self.seed, triggers=triggers, share=self.share if triggers else 0.0,
                                distill=self.distill, teacher_model=c.original, params=groups, recalibrate=norms,
                                refresh=refresh, extra_loss=extra, frozen_stats=not self.batch_stats,
                                label="bn-tune", progress=self.progress)
        c.details["bn_tune"] = {"tuned_parameters": int(sum(p.numel() for g in groups for p in g["params"])),
                                "parameters": int(sum(p.numel() for p in model.parameters())),
                                "adversarial": bool(adversarial), "batchnorm": norms}
        c.offer_epochs("bn-tune", model, tuned, patience=self.patience)
