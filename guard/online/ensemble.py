"""How the checks' scores become one verdict: a calibrated ensemble.

Each check sees some triggers well and others not at all (neuron activations catch patches and miss
blended keys; the overlap check is blind to anything but the reversed trigger). A union of per-check
thresholds spends the false-positive budget on every check, including the ones that say nothing about
the input at hand, and never adds up evidence that two checks see at once. :class:`FisherEnsemble`
turns every score into its tail probability on clean calibration traffic and combines them with
Fisher's method, ``-sum_j log p_j``; one threshold on that statistic, calibrated on the same clean
images, lets ``fpr`` of them through. Measured on the benchmark zoo: the Blended row's AUROC went
from 0.89 (union) to about 0.98 with the same checks plus the consistency one.

Tail probabilities are empirical inside the calibration sample and, beyond its top ``tail_share``,
an exponential tail fitted to the excesses (peaks over threshold), so scores past every calibration
image keep ranking instead of tying at ``1 / (n + 1)``. :class:`UnionRule` reproduces the earlier
rule (any check over its own threshold) for profiles written before the ensemble.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from guard.stats import upper_threshold


class _Rule:
    """What both rules share: ``statistic = reduce(contributions)`` and thresholds on it."""

    def contributions(self, scores: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def reduce(contributions: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def statistic(self, scores: np.ndarray) -> np.ndarray:
        """``(N,)`` the combined score of ``(N, n_checks)`` check scores (higher = more suspect)."""
        return self.reduce(self.contributions(scores))

    def threshold_at(self, scores: np.ndarray, fpr: float) -> float:
        """The threshold on :meth:`statistic` that lets ``fpr`` of the clean ``scores`` through."""
        return upper_threshold(self.statistic(scores), fpr)


class FisherEnsemble(_Rule):
    """Fisher's method over the checks' clean tail probabilities, with one calibrated threshold.

    ``fit(scores)`` learns each check's clean score distribution from ``(N, n_checks)`` calibration
    scores, ``infer_threshold(scores, fpr=...)`` sets ``threshold_``, ``statistic(scores)`` is the
    combined score (higher = more suspect) and ``contributions(scores)`` each check's share of it
    (its ``-log p``), which orders the reasons a verdict gives.
    """

    method = "fisher"

    def __init__(self, *, tail_share: float = 0.1):
        if not 0 < tail_share < 1:
            raise ValueError(f"tail_share must be in (0, 1), got {tail_share}")
        self.tail_share = float(tail_share)
        self.threshold_: float | None = None
        self.fpr_: float | None = None

    def fit(self, scores: np.ndarray) -> FisherEnsemble:
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or len(s) < 20:
            raise ValueError(f"need (N >= 20, n_checks) calibration scores, got shape {s.shape}")
        n = len(s)
        self.refs_ = np.sort(s, axis=0).T.astype(np.float32)  # (n_checks, n), ascending
        m = self._tail_count(n)
        self.t0_ = self.refs_[:, n - m - 1].astype(np.float64)
        excess = self.refs_[:, n - m:].astype(np.float64) - self.t0_[:, None]
        spread = (self.refs_[:, -1] - self.refs_[:, 0]).astype(np.float64)
        self.beta_ = np.maximum(excess.mean(1), np.maximum(1e-3 * spread, 1e-12))
        self._prepare()
        return self

    def _tail_count(self, n: int) -> int:
        """How many of ``n`` calibration scores (the top ones) fit the exponential tail."""
        return max(2, int(round(self.tail_share * n)))

    def _prepare(self) -> None:
        n = self.refs_.shape[1]
        m = self._tail_count(n)
        log_p0 = math.log((m + 1) / (n + 1))  # tail probability just above t0
        # -log p inside the sample, indexed by how many calibration scores are at least as high
        self._lut = (-np.log((np.arange(n + 1) + 1.0) / (n + 1.0))).astype(np.float32)
        self._t0_32 = self.t0_.astype(np.float32)
        self._inv_beta = (1.0 / self.beta_).astype(np.float32)
        self._shift = (self.t0_ / self.beta_ + log_p0).astype(np.float32)  # beyond t0: s / beta - shift
        # the same as Python lists: one input's five numbers cost less in Python than in numpy calls
        self._py = (self.refs_.tolist(), self._lut.tolist(), self._t0_32.tolist(), self._inv_beta.tolist(),
                    self._shift.tolist(), n)

    def contributions(self, scores: np.ndarray) -> np.ndarray:
        """``(N, n_checks)``: ``-log`` of each score's clean tail probability."""
        s = np.asarray(scores, dtype=np.float32)
        if len(s) == 1:
            return np.array([self._one(s[0].tolist())], dtype=np.float32)
        n = self.refs_.shape[1]
        # calibration scores at least as high as each score
        count = np.stack([n - np.searchsorted(r, s[:, j], side="left") for j, r in enumerate(self.refs_)], 1)
        return np.where(s > self._t0_32, s * self._inv_beta - self._shift, self._lut[count])

    def _one(self, scores: list[float]) -> list[float]:
        """:meth:`contributions` of one input in plain Python (the batch-1 hot path; same numbers)."""
        refs, lut, t0, inv_beta, shift, n = self._py
        return [v * inv_beta[j] - shift[j] if v > t0[j] else lut[n - bisect.bisect_left(refs[j], v)]
                for j, v in enumerate(scores)]

    @staticmethod
    def reduce(contributions: np.ndarray) -> np.ndarray:
        """Fisher's statistic from :meth:`contributions`: ``-sum_j log p_j``."""
        return contributions.sum(1)

    def infer_threshold(self, scores: np.ndarray, *, fpr: float) -> FisherEnsemble:
        """Set ``threshold_`` so that at most ``fpr`` of ``scores`` (clean) are over it."""
        self.threshold_ = self.threshold_at(scores, fpr)
        self.fpr_ = float(fpr)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {"refs": self.refs_, "t0": self.t0_.astype(np.float64), "beta": self.beta_.astype(np.float64)}

    def meta(self) -> dict[str, float | str]:
        return {"method": self.method, "tail_share": self.tail_share, "threshold": float(self.threshold_),
                "fpr": float(self.fpr_)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], meta: dict) -> FisherEnsemble:
        e = cls(tail_share=float(meta["tail_share"]))
        e.refs_ = np.ascontiguousarray(state["refs"], dtype=np.float32)
        e.t0_ = np.asarray(state["t0"], dtype=np.float64)
        e.beta_ = np.asarray(state["beta"], dtype=np.float64)
        e.threshold_, e.fpr_ = float(meta["threshold"]), float(meta["fpr"])
        e._prepare()
        return e


class UnionRule(_Rule):
    """The rule of profiles written before the ensemble: suspect when any check is over its threshold.

    ``statistic`` is the largest margin over a threshold relative to it, so ``threshold_ = 0`` gives
    exactly the union's decisions.
    """

    method = "union"

    def __init__(self, thresholds: np.ndarray):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self._scale = np.maximum(np.abs(self.thresholds), 1e-12)
        self.threshold_ = 0.0

    def contributions(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.thresholds) / self._scale

    @staticmethod
    def reduce(contributions: np.ndarray) -> np.ndarray:
        return contributions.max(1)
