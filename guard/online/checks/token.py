"""Token statistics per block: the largest deviation of a transformer's token from the clean tokens at its position."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, register
from guard.online.kernels import kernel


@kernel
def token_score(p, x, pred, f, g):
    """The largest, over the blocks, of a block's statistic in units of its clean scale."""
    first, scale = p
    best = np.float32(0.0)
    for b in range(scale.shape[0]):
        v = g[first + b] / scale[b]
        if v > best:
            best = v
    return best


@register
class TokenCheck(Check):
    """Label-agnostic, for token models: at each of a few encoder blocks, how far the input's most unusual
    token is from the clean tokens at its position (:class:`~guard.model.tokens.TokenStatistics`: the
    largest mean squared whitened deviation over the positions), each block's statistic divided by its
    own clean scale, and the largest of those.

    A patch trigger in a vision transformer is a token no clean image has at its position, at whichever
    block one looks: pooled over the tokens it is diluted, and by the last block the class token carries
    the target's evidence as a clean image of the target does, so the feature-layer checks and the pooled
    inner-layer ones miss it on some transformers (figures: docs/benchmarks.md, 'Measurements behind the
    defaults'). Calibrating each block on its own scale lets the block where the trigger shows most decide,
    whichever it is. The statistics ride in the inner row's last ``blocks`` channels
    (:class:`~guard.model.FeatureTap` with ``tokens``); the score reads them, one division per block.

    Parameters
    ----------
    blocks
        How many blocks' statistics the inner row carries (its last ``blocks`` channels).
    quantile
        The clean quantile of each block's statistic that is its scale: 0.99.

    Attributes
    ----------
    first_
        Where the first block's statistic sits in the pooled inner row (profile setting ``first``).
    scale_
        ``(blocks,)`` float32, each block's clean scale (profile key ``scale``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).
    """

    name = "token"
    kernel = token_score
    STATE = ("scale",)
    SETTINGS = ("first",)

    def __init__(self, *, blocks: int = 1, quantile: float = 0.99):
        self.blocks = blocks
        self.quantile = quantile

    def _fit(self, record, y):
        if record.inner is None:
            raise ValueError("the token check needs the inner layer's activations with the token statistics")
        channels = record.inner.shape[1] // 2  # the pooled row: every channel's mean, then its max
        if not 0 < int(self.blocks) <= channels:
            raise ValueError(f"the inner row has {channels} channels, fewer than {self.blocks} token statistics")
        self.first_ = int(channels - int(self.blocks))
        stats = record.inner[:, self.first_:channels]
        self.scale_ = np.maximum(np.quantile(stats, float(self.quantile), axis=0), 1e-6).astype(np.float32)

    @classmethod
    def _profile_parameters(cls, settings, tensors):
        return {**super()._profile_parameters(settings, tensors), "blocks": len(tensors["scale"])}

    def _restore(self):
        self.first_ = int(self.first_)

    def params(self):
        return (int(self.first_), np.ascontiguousarray(self.scale_, dtype=np.float32))
