"""Shared adversarial unlearning (after Wei et al., "Shared Adversarial Unlearning", NeurIPS 2023): a
purification that needs no reversed trigger, so it holds where the scan found none or a wrong one.

A backdoor is a short path from any input to one label. An adversarial perturbation of a clean image
that sends *both* the original model and the model being purified to the *same* wrong label is likely
to use that path (SAU's shared adversarial examples); training the purified model to answer such
images with their true label closes the path, while a distillation term keeps the clean answers of
the original model. Here the perturbation is one per batch (a universal perturbation, as I-BAU's
inner maximisation, so that it looks for what moves many images at once, as a trigger does) or one
per image, bounded in L-infinity in raw pixel space, found by a few signed-gradient steps that
maximise the log-probability that the two models agree on a wrong label.

Each epoch is offered to the accuracy-bounded selection; reversed triggers, when the profile has them,
only score the candidates.
"""

from __future__ import annotations

import torch
from torch import nn

from guard.purify.base import Candidates, Purifier
from guard.purify.tuning import finetune_epochs, norm_layers


def shared_perturbation(model: nn.Module, original: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                        steps: int, universal: bool, generator: torch.Generator) -> torch.Tensor:
    """A perturbation of ``x`` (raw pixels in [0, 1]; one for the batch when ``universal``) within
    ``eps`` in L-infinity that maximises ``log sum_{c != y} p_model(c) p_original(c)``: both models
    sent to the same wrong label. Neither model's weights receive gradients."""
    shape = (1, *x.shape[1:]) if universal else x.shape
    delta = (torch.rand(shape, generator=generator) * 2 - 1) * eps
    delta.requires_grad_(True)
    wrong = 1 - nn.functional.one_hot(y, num_classes=-1).float()
    for _ in range(steps):
        xa = (x + delta).clamp(0, 1)
        pm, po = model(xa).softmax(1), original(xa).softmax(1)
        if wrong.shape[1] < pm.shape[1]:
            wrong = nn.functional.pad(wrong, (0, pm.shape[1] - wrong.shape[1]), value=1.0)
        shared = (pm * po * wrong).sum(1).clamp_min(1e-12).log().mean()
        (grad,) = torch.autograd.grad(shared, delta)
        with torch.no_grad():
            delta += (2.5 * eps / steps) * grad.sign()
            delta.clamp_(-eps, eps)
    return (x + delta.detach()).clamp(0, 1)


class SharedAdversarialUnlearning(Purifier):
    """``--method sau``.

    Parameters
    ----------
    eps
        L-infinity bound of the perturbation in raw pixels ([0, 1]); 0.2.
    steps
        Signed-gradient steps of the inner maximisation (each of ``2.5 * eps / steps``); 5.
    universal
        One perturbation per batch (default: it looks for what moves many images at once, as a trigger
        does) instead of one per image.
    weight
        Weight of the loss on the shared adversarial images (at their true labels); 1.0.
    distill
        Weight of the term that keeps clean predictions where the original model had them; 1.0.
    epochs, lr, batch_size
        The fine-tuning (Adam; BatchNorm statistics frozen and re-estimated after every epoch): None
        epochs is 10, lr 1e-3, batches of 32.
    patience
        Fine-tuning stops after this many epochs in a row over the bound; 4.

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``).
    """

    method = "sau"

    def __init__(self, *, eps: float = 0.2, steps: int = 5, universal: bool = True, weight: float = 1.0,
                 distill: float = 1.0, epochs: int | None = None, lr: float = 1e-3, batch_size: int = 32,
                 patience: int = 4, **kw):
        super().__init__(**kw)
        self.eps = eps
        self.steps = steps
        self.universal = universal
        self.weight = weight
        self.distill = distill
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patience = patience

    def adversarial_loss(self, original: nn.Module, generator: torch.Generator):
        """The ``extra_loss`` of :func:`~guard.purify.tuning.finetune_epochs`: cross-entropy at the true
        labels on the batch's shared adversarial images, where the two models agree on a wrong label."""
        for p in original.parameters():
            p.requires_grad_(False)

        def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            was = model.training
            model.eval()
            xa = shared_perturbation(model, original, xb, yb, eps=self.eps, steps=self.steps,
                                     universal=self.universal, generator=generator)
            model.train(was)
            with torch.no_grad():
                shared = (original(xa).argmax(1) != yb).float()
            ce = nn.functional.cross_entropy(model(xa), yb, reduction="none")
            return self.weight * (ce * shared).sum() / max(len(yb), 1)

        return loss

    def propose(self, model: nn.Module, c: Candidates) -> None:
        import copy

        original = copy.deepcopy(c.original).eval()
        g = torch.Generator().manual_seed(self.seed + 1)
        tuned = finetune_epochs(model, c.x, c.y, epochs=self.epochs or 10, lr=self.lr, batch_size=self.batch_size,
                                seed=self.seed, distill=self.distill, teacher_model=original,
                                recalibrate=bool(norm_layers(model)),
                                extra_loss=self.adversarial_loss(original, g), label="sau", progress=self.progress)
        c.offer_epochs("sau", model, tuned, patience=self.patience)
