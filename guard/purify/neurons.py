"""Neurons a purification can switch off: every output channel of a conv (or of the BatchNorm after it)
and every unit of a hidden linear layer, plus the feature layer's inputs to the classifier.

Switching a neuron off writes zeros into the weights (never a hook), so the purified state_dict loads
into the user's own model file with every shape unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.model import feature_layer


@dataclass
class Unit:
    """A layer whose output channels are neurons: ``module`` (conv, BatchNorm or linear) and, for a
    conv followed by a BatchNorm, the ``norm`` whose affine shift would otherwise refill a zeroed channel."""

    name: str
    module: nn.Module
    norm: nn.Module | None
    size: int

    def switch_off(self, idx) -> None:
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        if len(idx) == 0:
            return
        with torch.no_grad():
            for m in (self.module, self.norm):
                if m is None:
                    continue
                if getattr(m, "weight", None) is not None:
                    m.weight[idx] = 0
                if getattr(m, "bias", None) is not None:
                    m.bias[idx] = 0

    @property
    def out(self) -> nn.Module:
        """The module whose output carries the neuron (the BatchNorm when there is one)."""
        return self.norm if self.norm is not None else self.module


def units(model: nn.Module) -> list[Unit]:
    """Conv layers (with their following BatchNorm, if any) and linear layers except the last, in order."""
    named = list(model.named_modules())
    out: list[Unit] = []
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    for i, (name, m) in enumerate(named):
        if isinstance(m, nn.Conv2d):
            norm = None
            for _, nxt in named[i + 1:i + 3]:
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.out_channels:
                    norm = nxt
                    break
                if isinstance(nxt, nn.Conv2d | nn.Linear):
                    break
            out.append(Unit(name, m, norm, m.out_channels))
        elif isinstance(m, nn.Linear) and name != last_linear:
            out.append(Unit(name, m, None, m.out_features))
    # the feature layer's own module is the classifier: its outputs are the logits, not neurons
    try:
        clf = feature_layer(model)[1]
        out = [u for u in out if u.module is not clf]
    except Exception:  # noqa: BLE001 - a model without a findable classifier still has its conv units
        pass
    return out


def classifier_inputs_off(model: nn.Module, idx, layer: str | None = None) -> None:
    """Switch off feature-layer neurons by zeroing their columns in the classifier (linear or 1x1 conv)."""
    _, clf = feature_layer(model, layer)
    idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    if len(idx) == 0:
        return
    with torch.no_grad():
        clf.weight[:, idx] = 0


def mask_order(masks) -> tuple[list[np.ndarray], list[tuple[int, int]], np.ndarray]:
    """Per-unit neuron masks (torch tensors, one per :class:`Unit`) to ``(values per unit, order, sorted
    values)``: every neuron as ``(unit index, channel)`` from the lowest mask to the highest (ties by
    unit, then channel), the order ANP and RNP prune in."""
    values = [m.detach().numpy().copy() for m in masks]
    flat = sorted((float(v), i, c) for i, vals in enumerate(values) for c, v in enumerate(vals))
    return values, [(i, c) for _, i, c in flat], np.array([v for v, _, _ in flat], dtype=np.float32)


def switch_off(model: nn.Module, unit_names: list[str], neurons) -> nn.Module:
    """Switch off ``neurons`` (``(unit index, channel)`` pairs, units named by ``unit_names``) in ``model``,
    in place; returns the model."""
    by_name = {u.name: u for u in units(model)}
    chosen: dict[int, list[int]] = {}
    for i, c in neurons:
        chosen.setdefault(i, []).append(c)
    for i, cs in chosen.items():
        by_name[unit_names[i]].switch_off(cs)
    return model


class MaskedUnits:
    """A mask ``m`` and an adversarial weight/bias scaling ``dw``/``db`` per neuron of each unit, applied
    by forward hooks as ``m * ((1 + dw) * (out - b) + (1 + db) * b)`` (ANP) or ``m * out`` with
    ``adversary`` off (RNP), while :meth:`attached` (a context manager that always removes them)."""

    def __init__(self, unit_list: list[Unit]):
        self.units = unit_list
        self.masks = [torch.ones(u.size, requires_grad=True) for u in unit_list]
        self.dw = [torch.zeros(u.size, requires_grad=True) for u in unit_list]
        self.db = [torch.zeros(u.size, requires_grad=True) for u in unit_list]
        self.adversary = False

    def _hook(self, i: int):
        def hook(module, _inp, out):
            b = getattr(module, "bias", None)
            shape = (1, -1) + (1,) * (out.ndim - 2)
            bias = b.view(shape) if b is not None else torch.zeros((), dtype=out.dtype)
            m = self.masks[i].view(shape)
            if not self.adversary:
                return m * out
            return m * ((1 + self.dw[i].view(shape)) * (out - bias) + (1 + self.db[i].view(shape)) * bias)
        return hook

    @contextlib.contextmanager
    def attached(self):
        handles = [u.out.register_forward_hook(self._hook(i)) for i, u in enumerate(self.units)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
