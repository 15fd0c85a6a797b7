"""The one fine-tuning loop every purification method shares, and the BatchNorm bookkeeping around it.

:func:`finetune_epochs` trains in place and yields after every epoch, so that a method can offer each
epoch's state to the accuracy-bounded selection (:mod:`guard.purify.selection`) and stop when it keeps
getting worse. Stamping (a share of each batch carries a trigger at its true label), distillation
towards the original model's answers, a restricted parameter set and a per-step hook (to hold pruned
weights at zero) are options of the same loop, not separate loops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from guard._progress import Progress
from guard.model import Normalized
from guard.purify.triggers import Trigger, stamp_batch


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state_dict (a candidate the selection can restore)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bare(model: nn.Module) -> nn.Module:
    """The user's module inside guard's normalisation wrapper (whose state_dict the user's file loads)."""
    return model.model if isinstance(model, Normalized) else model


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def finetune_epochs(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
                    batch_size: int = 32, seed: int = 0, triggers: list[Trigger] | None = None, share: float = 0.0,
                    refresh: Callable[[nn.Module], list[Trigger] | None] | None = None, frozen_stats: bool = True,
                    distill: float = 0.0, params: Iterable[nn.Parameter] | Iterable[dict] | None = None,
                    after_step: Callable[[nn.Module], None] | None = None, optimizer: str = "adam",
                    recalibrate: bool = False, teacher_model: nn.Module | None = None,
                    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    label: str = "finetune", progress: bool | None = None) -> Iterator[int]:
    """Fine-tune ``model`` in place on ``(x, y)``, yielding the epoch number after every epoch.

    Parameters
    ----------
    epochs, lr, batch_size, seed
        The schedule (Adam, or SGD with momentum 0.9 when ``optimizer="sgd"``); every draw is seeded.
    triggers, share
        ``share`` of each batch carries one of ``triggers`` and keeps its true label (unlearning).
    refresh
        Called before every epoch after the first; may return a new trigger list (triggers
        re-synthesised on the current model).
    frozen_stats
        BatchNorm keeps its running statistics while training (a few hundred images would otherwise
        move them off the training distribution); False trains in train mode (batch statistics, dropout).
    distill, teacher_model
        Weight of a KL term that keeps every image's prediction close to what ``teacher_model``
        (default: ``model`` before fine-tuning) answered for the unstamped image.
    params
        What is trained (default: every parameter), or the optimiser's parameter groups (dicts with
        ``params`` and, where a group has its own rate, ``lr``).
    after_step
        Runs after every optimiser step (e.g. to hold pruned weights at zero).
    recalibrate
        Re-estimate the BatchNorm statistics on ``x`` after every epoch (:func:`recalibrate_norms`).
    extra_loss
        ``extra_loss(model, xb, yb)`` is added to every batch's loss (adversarial unlearning adds its
        perturbed images this way).
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    trained = list(model.parameters() if params is None else params)
    opt = (torch.optim.Adam(trained, lr=lr) if optimizer == "adam" else
           torch.optim.SGD(trained, lr=lr, momentum=0.9))
    triggers = list(triggers or [])
    teacher = None
    if distill > 0:
        with torch.no_grad():
            src = model if teacher_model is None else teacher_model
            was = src.training
            src.eval()
            teacher = torch.cat([src(xt[i:i + 256]).softmax(1) for i in range(0, len(xt), 256)])
            src.train(was)
    with Progress(label, epochs, enabled=progress) as bar:
        for epoch in range(epochs):
            if refresh is not None and epoch > 0:
                model.eval()
                triggers = refresh(model) or triggers
            model.eval() if frozen_stats else model.train()
            perm = torch.randperm(len(xt), generator=g)
            for i in range(0, len(xt), batch_size):
                idx = perm[i:i + batch_size]
                xb = stamp_batch(xt[idx], triggers, share, g)
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits, yt[idx])
                if teacher is not None:
                    loss = loss + distill * nn.functional.kl_div(logits.log_softmax(1), teacher[idx],
                                                                 reduction="batchmean")
                if extra_loss is not None:
                    loss = loss + extra_loss(model, xt[idx], yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
            if recalibrate:
                recalibrate_norms(model, xt)
            model.eval()
            bar.update(1)
            yield epoch + 1


@torch.no_grad()
def recalibrate_norms(model: nn.Module, x: torch.Tensor | np.ndarray, *, batch_size: int = 256) -> bool:
    """Re-estimate every BatchNorm layer's running statistics on ``x`` (a cumulative average over one
    pass, weights untouched). Fine-tuning with frozen statistics moves the convolutions under them, so
    the stored statistics no longer describe what the layers now output; True when there was one."""
    norms = norm_layers(model)
    if not norms:
        return False
    x = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    was = model.training
    model.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was)
    return True
