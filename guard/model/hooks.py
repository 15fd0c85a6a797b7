"""Hooks on a model that always remove themselves: :class:`HookSet` and the online path's :class:`FeatureTap`."""

from __future__ import annotations

import torch
from torch import nn

from guard.model.layers import feature_layer, pool_features, token_map
from guard.model.tokens import TokenStatistics


class HookSet:
    """Forward hooks registered together and always removed together: ``__enter__`` calls
    :meth:`_register` (which appends each handle to ``_handles``) and, should it fail half-way, removes
    what it registered; ``__exit__`` removes every handle."""

    _handles: list

    def _register(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()


class FeatureTap(HookSet):
    """Context manager that records the input of the feature layer on every forward, as ``(N, D)``
    (:func:`pool_features` pools spatial maps and token sequences).

    The hook is registered on ``__enter__`` and always removed on ``__exit__``, exceptions included.
    ``features`` holds the last batch's features ``(N, D)`` (with gradient if the forward had one).
    With ``inner`` (a module, see :func:`inner_layer`) a second hook keeps that module's output of
    the last batch in ``inner``, an unpooled tensor (``(N, C, H, W)``; :func:`guard.online.checks.pool` pools it).
    With ``tokens`` (fitted :class:`~guard.model.tokens.TokenStatistics` of a token model) a hook on each of
    its blocks computes the block's statistic, and ``inner`` carries them as its last channels, one per
    block, constant over the map (so the pooled row holds each block's statistic; the ``token`` check
    reads them there).

    >>> import torch
    >>> from guard import FeatureTap
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8, 10))
    >>> with torch.no_grad(), FeatureTap(net) as tap:  # the input of the last nn.Linear
    ...     logits = net(torch.rand(4, 3, 16, 16))
    >>> tuple(tap.features.shape), len(net[4]._forward_pre_hooks)  # the hook is gone after the block
    ((4, 8), 0)
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None, *, inner: nn.Module | None = None,
                 tokens: TokenStatistics | None = None):
        if isinstance(layer, nn.Module):  # already resolved (the online hot path resolves it once)
            self.name, self.module = "", layer
        else:
            self.name, self.module = feature_layer(model, layer)
        self.features: torch.Tensor | None = None
        self._inner: torch.Tensor | None = None
        self._inner_module = inner
        self._model = model
        self._tokens = tokens
        self._stats: list[torch.Tensor | None] = [] if tokens is None else [None] * len(tokens.blocks_)
        self._handles: list = []

    @property
    def inner(self) -> torch.Tensor | None:
        """The inner layer's output of the last batch, with the token statistics as extra channels."""
        if self._inner is None or not self._stats:
            return self._inner
        n, _, h, w = self._inner.shape
        return torch.cat((self._inner, torch.stack(self._stats, 1)[:, :, None, None].expand(n, -1, h, w)), 1)

    def _hook(self, module, args):
        a = args[0]
        self.features = a if a.ndim == 2 else pool_features(a)

    def _inner_hook(self, module, args, out):
        self._inner = token_map(out) if out.ndim == 3 else out

    def _token_hook(self, i: int):
        def keep(module, args, out):
            self._stats[i] = self._tokens.statistic(i, out)
        return keep

    def _register(self) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._hook))
        if self._inner_module is not None:
            self._handles.append(self._inner_module.register_forward_hook(self._inner_hook))
        if self._tokens is not None:
            for i, name in enumerate(self._tokens.blocks_):
                self._handles.append(self._model.get_submodule(name).register_forward_hook(self._token_hook(i)))
