"""Per-layer activation moments of a model: what an attacker who knows guard's documented statistics matches.

guard's online checks compare an input's activations with clean statistics of the class the model
predicts. An attacker who knows that (the bench's gray-box attacker, :mod:`guard.bench.graybox`) and the
scan's own stand-in for it (:mod:`guard.scan.adaptive_key`) make a trigger's activations match clean
target-class images' at *every* layer they can hook. :class:`LayerStatistics` hooks every leaf module of
the model (convolutions, normalisations, activations, pooling) and the classifier's input and pools each
output per channel: the spatial mean of each channel (the mean over tokens for a token layer), and for
feature maps also each channel's spatial standard deviation; :func:`clean_moments` records, per layer and
channel, the mean and the spread of both over clean images; :func:`moment_loss` is a batch's mismatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from guard.model import find_classifier, probe_input
from guard.online.trajectory import pool_output, traced_module


def _pooled(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per input and channel: the mean over space (or tokens) and, for feature maps, the spatial std."""
    if a.ndim == 4:
        flat = a.flatten(2)
        return flat.mean(2), flat.std(2, unbiased=False)
    if a.ndim == 3:  # tokens (N, T, D)
        return a.mean(1), None
    return a.flatten(1), None


class LayerStatistics:
    """Forward hooks on every leaf module and the classifier's input; :meth:`capture` records their pooled
    activations for one forward. Used as a context manager (:meth:`hooked`) that always removes its hooks.

    ``layers_`` names the hooked layers (a module's output, or ``NAME:input`` for the classifier's input).
    """

    def __init__(self, model: nn.Module, shape: tuple[int, int, int], *, grids: bool = False):
        self.model = model
        x = probe_input(model, shape)
        self.classifier_ = find_classifier(model, x)
        self.layers_: list[str] = []
        self.grids = grids
        self.grids_: dict[str, torch.Tensor] = {}
        self._pooled: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @contextlib.contextmanager
    def hooked(self) -> Iterator[LayerStatistics]:
        handles = []
        modules = dict(self.model.named_modules())

        def out_hook(name):
            def hook(module, args, out):
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    self._pooled[name] = _pooled(out)
                    if self.grids and traced_module(module):  # the trajectory check's view of the layer
                        self.grids_[name] = pool_output(module, out)
            return hook

        def in_hook(name):
            def hook(module, args):
                if args and isinstance(args[0], torch.Tensor):
                    self._pooled[name] = _pooled(args[0])
            return hook

        try:
            for name, m in modules.items():
                if name and name != self.classifier_ and not list(m.children()):
                    handles.append(m.register_forward_hook(out_hook(name)))
            handles.append(modules[self.classifier_].register_forward_pre_hook(in_hook(self.classifier_ + ":input")))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._pooled = {}

    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """Logits of ``x`` and every hooked layer's pooled activations (inside :meth:`hooked`)."""
        self._pooled, self.grids_ = {}, {}
        logits = self.model(x)
        pooled = dict(self._pooled)
        if not self.layers_:
            self.layers_ = sorted(pooled)
        return logits, pooled


def clean_moments(stats: LayerStatistics, x: torch.Tensor, batch: int = 256) -> dict[str, tuple]:
    """Per layer: mean and spread over ``x`` of each channel's pooled mean (and spatial std where there is one)."""
    parts: dict[str, list] = {}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            _, pooled = stats.capture(x[i:i + batch])
            for k, v in pooled.items():
                parts.setdefault(k, []).append(v)
    out = {}
    for k, vs in parts.items():
        m = torch.cat([v[0] for v in vs])
        s = torch.cat([v[1] for v in vs]) if vs[0][1] is not None else None
        out[k] = (m.mean(0), m.std(0).clamp_min(1e-3),
                  None if s is None else s.mean(0), None if s is None else s.std(0).clamp_min(1e-3))
    return out


def moment_loss(pooled: dict[str, tuple], moments: dict[str, tuple]) -> torch.Tensor:
    """Mean over layers of the moment mismatch between a batch's pooled activations and the clean moments."""
    terms = []
    for k, (mu, sd, smu, ssd) in moments.items():
        m, s = pooled[k]
        t = (((m.mean(0) - mu) / sd) ** 2).mean() + (torch.log(m.std(0).clamp_min(1e-3) / sd) ** 2).mean()
        if s is not None and smu is not None:
            t = t + (((s.mean(0) - smu) / ssd) ** 2).mean() + (torch.log(s.std(0).clamp_min(1e-3) / ssd) ** 2).mean()
        terms.append(t)
    return torch.stack(terms).mean()
