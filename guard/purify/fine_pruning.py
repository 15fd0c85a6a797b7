"""Fine-Pruning (Liu et al., RAID 2018), a published baseline: a backdoor tends to live in channels of
the last convolutional layer that clean inputs leave dormant.

Channels are switched off in order of increasing mean activation on clean data, a few more at each
step, each step offered to the accuracy-bounded selection; the most pruned step within the bound is
then fine-tuned briefly on clean data with the pruned channels held at zero, and offered too. Every
shape stays (pruned channels are zeroed), so the state_dict loads into the user's model file.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.errors import InputError
from guard.purify.base import Candidates, Purifier
from guard.purify.neurons import Unit, units
from guard.purify.tuning import finetune_epochs


def last_conv(model: nn.Module) -> Unit:
    """The last conv layer (with the BatchNorm after it, whose shift would refill a pruned channel)."""
    convs = [u for u in units(model) if isinstance(u.module, nn.Conv2d)]
    if not convs:
        raise InputError("fine-pruning needs a convolutional layer (nn.Conv2d); the model has none")
    return convs[-1]


@torch.no_grad()
def channel_activation(model: nn.Module, layer: nn.Module, x: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Mean ReLU'd output of ``layer`` per channel over ``x`` (what "dormant on clean data" means)."""
    acc: list[torch.Tensor] = []

    def hook(_m, _i, out):
        acc.append(out.clamp_min(0).mean(dim=(0, 2, 3)) * out.shape[0])

    handle = layer.register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])))
    finally:
        handle.remove()
        model.train(was)
    return (torch.stack(acc).sum(0) / len(x)).numpy()


class FinePruning(Purifier):
    """``--method fine-pruning``.

    Parameters
    ----------
    step
        Channels switched off per step (None: a 32nd of the layer's channels, at least one).
    max_share
        At most this share of the layer's channels is pruned; 0.9.
    epochs, lr, batch_size
        The fine-tuning after pruning (Adam, train mode): 1 epoch at lr 1e-3 on batches of 64, the brief
        fine-tuning of the method; 0 epochs skips it.

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``). The learned attributes are the base's; ``details_`` adds ``layer``,
    ``channels``, ``channel_order`` (least active first) and ``pruned_channels`` (how many of them the
    most pruned step within the bound switched off: the fine-tuned candidates').
    """

    method = "fine-pruning"

    def __init__(self, *, step: int | None = None, max_share: float = 0.9, epochs: int = 1, lr: float = 1e-3,
                 batch_size: int = 64, **kw):
        super().__init__(**kw)
        self.step = step
        self.max_share = max_share
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size

    def propose(self, model: nn.Module, c: Candidates) -> None:
        unit = last_conv(model)
        act = channel_activation(model, unit.module, c.x)
        order = np.argsort(act, kind="stable")
        step = self.step or max(1, unit.size // 32)
        counts = range(step, int(self.max_share * unit.size) + 1, step)
        pruned = c.offer_steps("prune", model, lambda m, n: unit.switch_off(order[:n]), counts)
        c.details.update({"layer": unit.name, "pruned_channels": pruned, "channels": int(unit.size),
                          "channel_order": [int(i) for i in order]})
        if self.epochs <= 0 or pruned == 0:
            return
        def hold(_model: nn.Module) -> None:  # pruned channels stay at zero while fine-tuning
            unit.switch_off(order[:pruned])

        hold(model)
        tuned = finetune_epochs(model, c.x, c.y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                seed=self.seed, frozen_stats=False, after_step=hold, label="fine-prune",
                                progress=self.progress)
        c.offer_epochs("fine-pruning", model, tuned, patience=self.epochs)
