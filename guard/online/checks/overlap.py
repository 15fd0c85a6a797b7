"""Reversed-trigger overlap: how unusually the input matches a suspect label's reversed pattern in its mask."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, register, standardiser
from guard.online.kernels import kernel


@kernel
def overlap_match(xs, pattern, mask):
    """One suspect label's match ``1 - sum(m * |x - p|)`` on the masks' support (``m`` is normalised by
    ``C * sum(m)``, so the match is 1 where the input is the reversed pattern)."""
    return 1.0 - (np.abs(xs - pattern) * mask).sum()


@kernel
def overlap_score(p, x, pred, f, g):
    """The largest absolute standardised match ``|(match - mu) / sd|`` over the suspect labels."""
    idx, pattern, mask, mu, sd = p
    xs = x[idx]
    best = 0.0
    for lab in range(pattern.shape[0]):
        v = abs((overlap_match(xs, pattern[lab], mask[lab]) - mu[lab]) / sd[lab])
        if v > best:
            best = v
    return best


@register
class OverlapCheck(Check):
    """How unusually the input matches each suspect label's reversed pattern inside its reversed mask.

    Per label: ``1 - sum(m * |x - p|) / (C * sum(m))``, standardised on clean inputs; the score is
    the largest *absolute* deviation over the suspect labels. Two-sided on purpose: the reversed
    pattern is one trigger that works, not the attacker's, and on the demo model a stamped patch
    inside the mask sits consistently *farther* from the reversed pattern than clean pixels do, so a
    one-sided score ranks triggered inputs below clean ones (figures: docs/benchmarks.md, 'Measurements
    behind the defaults'). Catches a trigger where the reversed mask found it.

    Parameters
    ----------
    masks
        ``(L, 1, H, W)`` the suspect labels' reversed masks in [0, 1] (Neural Cleanse's ``masks_`` rows);
        only their support (weights over :attr:`SUPPORT` of the largest) is scored.
    patterns
        ``(L, C, H, W)`` the matching reversed patterns in [0, 1] (``patterns_`` rows).

    Attributes
    ----------
    m_
        ``(L, C*H*W)`` float32, the masks broadcast over the channels and normalised by ``C * sum(m)``
        (profile key ``m``).
    p_
        ``(L, C*H*W)`` float32, the patterns, flattened (profile key ``p``).
    mu_, sd_
        ``(L,)`` float32, each label's clean match mean and standard deviation (profile keys ``mu``, ``sd``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).

    A check restored from a profile has the attributes but not ``masks`` and ``patterns``, which the
    profile stores normalised.
    """

    name = "overlap"
    kernel = overlap_score
    STATE = ("m", "p", "mu", "sd")

    SUPPORT = 1e-3
    """Mask weights below this share of the largest are dropped: a reversed mask is a few dozen pixels
    of weight near 1 over a near-zero rest, and scoring only its support keeps the check to a
    gather and a few hundred operations per input instead of the whole image."""

    def __init__(self, masks: np.ndarray, patterns: np.ndarray):
        self.masks = masks
        self.patterns = patterns

    def _restore(self) -> None:
        """The masks' support and the masks and patterns on it (what the kernel reads)."""
        self._idx = np.flatnonzero(self.m_.max(0) > self.SUPPORT * max(float(self.m_.max()), 1e-12)).astype(np.int64)
        self._m_s = np.ascontiguousarray(self.m_[:, self._idx], dtype=np.float32)
        self._p_s = np.ascontiguousarray(self.p_[:, self._idx], dtype=np.float32)

    def _fit(self, record, y):
        masks, patterns = np.asarray(self.masks), np.asarray(self.patterns)
        c = patterns.shape[1]
        m = np.broadcast_to(masks, patterns.shape).reshape(len(masks), -1).astype(np.float32)
        self.m_ = m / (c * np.maximum(masks.reshape(len(masks), -1).sum(1, keepdims=True), 1e-6))
        self.p_ = patterns.reshape(len(patterns), -1).astype(np.float32)
        self._restore()
        flat = np.ascontiguousarray(record.x, dtype=np.float32).reshape(len(record.x), -1)
        match = np.array([[overlap_match(row[self._idx], p, m) for p, m in zip(self._p_s, self._m_s)] for row in flat])
        self.mu_, self.sd_ = standardiser(match.reshape(len(flat), len(self._p_s)))

    def params(self):
        return (self._idx, self._p_s, self._m_s, np.asarray(self.mu_, np.float32), np.asarray(self.sd_, np.float32))
