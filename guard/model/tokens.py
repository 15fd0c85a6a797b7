"""How far a transformer's tokens are from the clean tokens at their position, block by block.

A patch trigger in a vision transformer is one or two tokens that no clean image has at that position.
Pooled over the tokens (:func:`guard.model.token_map`) it is diluted among the others, and by the last
block the class token carries the target's evidence like a clean image of the target does; but at every
block the trigger's own token stays far from the clean tokens at its position. :class:`TokenStatistics`
learns, for a few of a model's token blocks, the clean tokens' mean at each position and one whitening
of their deviations, and gives each input, per block, its largest whitened deviation over the positions.
The online tap (:class:`guard.model.FeatureTap`) computes it in the blocks' forward hooks and the
``token`` check (:mod:`guard.online.checks.token`) reads it, calibrated per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from guard.model.evaluation import frozen

MAX_BLOCKS = 4
"""Blocks read at most: the first, the last before the features and evenly spaced ones between."""


def pick_blocks(blocks: Sequence[str], at_most: int = MAX_BLOCKS) -> list[str]:
    """``at_most`` of ``blocks`` (in order), evenly spaced, the first and the last included."""
    blocks = list(blocks)
    if len(blocks) <= at_most:
        return blocks
    idx = sorted({int(round(i)) for i in np.linspace(0, len(blocks) - 1, at_most)})
    return [blocks[i] for i in idx]


class TokenStatistics:
    """Per block: the clean tokens' mean at each position ``(T, D)`` and a whitening ``(D, D)`` of the
    deviations from it (one covariance shared by the positions, shrunk towards its mean variance by
    ``shrinkage``); an input's statistic at a block is the largest, over positions, mean squared
    whitened deviation of its token (about 1 for a clean token).

    Parameters
    ----------
    shrinkage
        Added to the covariance's diagonal as a share of its mean variance before it is inverted: 1e-3,
        enough to keep the inverse finite where a few dimensions are nearly constant.
    batch_size
        Images per forward while fitting.

    Attributes
    ----------
    blocks_
        The blocks' module names, in forward order.
    mean_, whiten_
        Per block, ``(T, D)`` and ``(D, D)`` float32 tensors.
    """

    def __init__(self, *, shrinkage: float = 1e-3, batch_size: int = 256):
        self.shrinkage = shrinkage
        self.batch_size = batch_size

    def fit(self, model: nn.Module, x: np.ndarray, blocks: Sequence[str]) -> TokenStatistics:
        """Learn each block's statistics from the clean images ``x`` (one pass, sums in float64)."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError("TokenStatistics needs at least one token block")
        seen: dict[str, torch.Tensor] = {}
        sums: dict[str, list] = {b: [None, None, 0] for b in blocks}  # sum of tokens, of outer products, count
        handles = []
        try:  # registered inside: a block that is not a module (get_submodule raises) leaves no hook behind
            for b in blocks:
                handles.append(model.get_submodule(b).register_forward_hook(
                    lambda m, a, o, b=b: seen.__setitem__(b, o)))
            with frozen(model), torch.inference_mode():
                for i in range(0, len(x), self.batch_size):
                    model(torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size], dtype=np.float32)))
                    for b in blocks:
                        z = seen[b].double()
                        if z.ndim != 3:
                            raise ValueError(f"block {b!r} returns shape {tuple(z.shape)}, not tokens (N, T, D)")
                        s = sums[b]
                        flat = z.reshape(-1, z.shape[2])
                        s[0] = z.sum(0) if s[0] is None else s[0] + z.sum(0)
                        s[1] = flat.T @ flat if s[1] is None else s[1] + flat.T @ flat
                        s[2] += len(z)
        finally:
            for h in handles:
                h.remove()
        self.blocks_ = blocks
        self.mean_, self.whiten_ = [], []
        for b in blocks:
            total, outer, n = sums[b]
            mean = total / n  # (T, D)
            cov = (outer - n * mean.T @ mean) / max(n * mean.shape[0] - 1, 1)  # deviations pooled over positions
            d = cov.shape[0]
            ridge = self.shrinkage * torch.trace(cov) / d * torch.eye(d, dtype=cov.dtype)
            evals, evecs = torch.linalg.eigh(cov + ridge)
            self.mean_.append(mean.float())
            self.whiten_.append((evecs / evals.clamp_min(1e-12).sqrt()).float())
        return self

    def statistic(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        """``(N,)``: block ``i``'s output ``(N, T, D)`` as its largest mean squared whitened deviation."""
        dev = (tokens - self.mean_[i]) @ self.whiten_[i]
        return dev.pow(2).mean(2).amax(1)

    def to_profile(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """``(blocks, tensors)``: the block names and the arrays by profile key (``mean.I``, ``whiten.I``)."""
        tensors = {}
        for i, (m, w) in enumerate(zip(self.mean_, self.whiten_)):
            tensors[f"mean.{i}"], tensors[f"whiten.{i}"] = m.numpy(), w.numpy()
        return list(self.blocks_), tensors

    @classmethod
    def from_profile(cls, blocks: Sequence[str], tensors: dict[str, np.ndarray]) -> TokenStatistics:
        """Rebuild fitted statistics from :meth:`to_profile`'s output; ValueError when an array is missing or
        the shapes disagree."""
        t = cls()
        t.blocks_ = list(blocks)
        t.mean_, t.whiten_ = [], []
        for i in range(len(t.blocks_)):
            mean, whiten = tensors[f"mean.{i}"], tensors[f"whiten.{i}"]
            if mean.ndim != 2 or whiten.shape != (mean.shape[1], mean.shape[1]):
                raise ValueError(f"token statistics {i}: mean {mean.shape} and whitening {whiten.shape} disagree")
            t.mean_.append(torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float32)))
            t.whiten_.append(torch.from_numpy(np.ascontiguousarray(whiten, dtype=np.float32)))
        return t
