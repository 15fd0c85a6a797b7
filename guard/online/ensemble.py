"""How the checks' scores become one verdict: a calibrated ensemble.

Each check sees some triggers well and others not at all (neuron activations catch patches and miss
blended keys; the overlap check is blind to anything but the reversed trigger). A union of per-check
thresholds spends the false-positive budget on every check, including the ones that say nothing about
the input at hand, and never adds up evidence that two checks see at once. :class:`FisherEnsemble`
turns every score into its tail probability on clean calibration traffic and combines them with
Fisher's method, weighted: ``-sum_j w_j log p_j``, where ``w_j`` is how well check ``j`` separates the
scan's reversed triggers from clean images (a check that sees nothing of them only adds noise to the
sum); one threshold on that statistic, calibrated on the same clean images, lets ``fpr`` of them
through. On the benchmark zoo's Blended model the ensemble (with the consistency check added)
separates triggered inputs clearly better than the union of per-check thresholds did (figures:
docs/benchmarks.md, 'Measurements behind the defaults').

Tail probabilities are empirical inside the calibration sample and, beyond its top ``tail_share``,
an exponential tail fitted to the excesses (peaks over threshold), so scores past every calibration
image keep ranking instead of tying at ``1 / (n + 1)``. :class:`UnionRule` reproduces the earlier
rule (any check over its own threshold) for profiles written before the ensemble.

Each rule's statistic is defined once, as its ``kernel`` over one input's scores (compiled with
numba where it is there, numpy otherwise); :mod:`guard.online.scoring` runs it for batches and single
inputs alike, right after the checks' kernels.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from guard.online.kernels import kernel
from guard.stats import roc_auc, upper_threshold


@kernel
def fisher_statistic(p, s, c):
    """Fill ``c`` with each score's weighted ``-log`` clean tail probability and return their sum."""
    refs, lut, t0, inv_beta, shift, weights = p
    n = refs.shape[1]
    stat = 0.0
    for j in range(s.shape[0]):
        v = s[j]
        if v > t0[j]:  # beyond the empirical part: the fitted exponential tail
            cj = v * inv_beta[j] - shift[j]
        else:  # how many calibration scores are at least as high
            cj = lut[n - np.searchsorted(refs[j], v)]
        c[j] = weights[j] * cj
        stat += c[j]
    return stat


@kernel
def union_statistic(p, s, c):
    """Fill ``c`` with each score's margin over its threshold relative to it; return the largest."""
    thresholds, scale = p
    best = -np.inf
    for j in range(s.shape[0]):
        cj = (s[j] - thresholds[j]) / scale[j]
        c[j] = cj
        if cj > best:
            best = cj
    return best


class _Rule:
    """What both rules share: a ``kernel`` over one input's scores, run by :mod:`guard.online.scoring`."""

    kernel: ClassVar[Any] = None
    threshold_: float | None

    def params(self) -> tuple:  # pragma: no cover - interface
        raise NotImplementedError

    def evaluate(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(contributions (N, n_checks), statistic (N,))`` of ``(N, n_checks)`` check scores."""
        from guard.online.scoring import rule_rows

        s = np.ascontiguousarray(scores, dtype=np.float32)
        c = np.zeros(s.shape, dtype=np.float32)
        stat = np.empty(len(s), dtype=np.float32)
        rule_rows(type(self).kernel)(self.params(), s, c, stat)
        return c, stat

    def contributions(self, scores: np.ndarray) -> np.ndarray:
        """``(N, n_checks)`` each check's share of the statistic (orders the reasons a verdict gives)."""
        return self.evaluate(scores)[0]

    def statistic(self, scores: np.ndarray) -> np.ndarray:
        """``(N,)`` the combined score of ``(N, n_checks)`` check scores (higher = more suspect)."""
        return self.evaluate(scores)[1]

    def threshold_at(self, scores: np.ndarray, fpr: float) -> float:
        """The threshold on :meth:`statistic` that lets ``fpr`` of the clean ``scores`` through."""
        return upper_threshold(self.statistic(scores), fpr)


class FisherEnsemble(_Rule):
    """Fisher's method over the checks' clean tail probabilities, with one calibrated threshold.

    ``fit(scores, anomalies=...)`` learns each check's clean score distribution from ``(N, n_checks)``
    calibration scores and, when ``anomalies`` are given, each check's weight ``weights_``;
    ``infer_threshold(scores, fpr=...)`` sets ``threshold_``, ``statistic(scores)`` is the combined
    score (higher = more suspect) and ``contributions(scores)`` each check's weighted share of it
    (``weight * -log p``), which orders the reasons a verdict gives.

    ``anomalies`` are the scores of inputs the model is known to treat abnormally: the scan's
    reversed triggers stamped on clean images. A check's weight is how well it separates them from
    the clean scores, ``2 * AUROC - 1`` floored at 0 (a check they leave at clean levels only adds its
    clean spread to the sum) and divided by the largest weight. Without anomalies, or when no check
    separates them, every weight is 1 (the plain Fisher sum). ``adaptive`` are the scores of inputs
    stamped with the scan's own adaptive key (a trigger that matched clean statistics at every layer,
    :mod:`guard.scan.adaptive_key`); each weight is then also scaled by the share of them the check
    sees (:func:`detection_rates`, :func:`separation_weights`), so that the checks an adapted trigger
    dilutes weigh less. The weights matter where one check alone
    sees the trigger: on the small ViT only the first-block k-NN check sees a patch trigger, and the
    three blind checks' noise drowns it in the plain sum but not in the weighted one; on the DemoNet,
    ResNet-18 and all-convolutional rows the two agree (figures: docs/benchmarks.md, 'Measurements
    behind the defaults').

    Parameters
    ----------
    tail_share
        Share of the calibration scores (the top ones, at least 2) whose excesses over the next one fit
        each check's exponential tail, in (0, 1); 0.1 leaves the empirical distribution the bulk of the
        sample and the tail fit enough points on a few hundred calibration images.

    Attributes
    ----------
    refs_
        ``(n_checks, N)`` float32, each check's calibration scores, ascending (profile key ``refs``).
    t0_, beta_
        ``(n_checks,)`` where each check's exponential tail starts and its mean excess (``t0``, ``beta``).
    weights_
        ``(n_checks,)`` each check's weight (``weights``).
    adaptive_rates_
        ``(n_checks,)`` the share of the ``adaptive`` inputs each check sees (:func:`detection_rates`), or
        None without them (not saved in the profile: the weights carry it).
    threshold_, fpr_
        The threshold on the statistic and the clean rate it lets through (:meth:`infer_threshold`).
    """

    method = "fisher"
    kernel = fisher_statistic

    def __init__(self, *, tail_share: float = 0.1):
        self.tail_share = tail_share

    def _validate(self) -> None:
        if not 0 < self.tail_share < 1:
            raise ValueError(f"tail_share must be in (0, 1), got {self.tail_share}")

    def fit(self, scores: np.ndarray, *, anomalies: np.ndarray | None = None,
            adaptive: np.ndarray | None = None) -> FisherEnsemble:
        self._validate()
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or len(s) < 20:
            raise ValueError(f"need (N >= 20, n_checks) calibration scores, got shape {s.shape}")
        self.adaptive_rates_ = None if adaptive is None or len(adaptive) == 0 else detection_rates(s, adaptive)
        self.weights_ = separation_weights(s, anomalies, adaptive_rates=self.adaptive_rates_)
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
        return max(2, int(round(float(self.tail_share) * n)))

    def _prepare(self) -> None:
        n = self.refs_.shape[1]
        m = self._tail_count(n)
        log_p0 = math.log((m + 1) / (n + 1))  # tail probability just above t0
        # -log p inside the sample, indexed by how many calibration scores are at least as high
        lut = (-np.log((np.arange(n + 1) + 1.0) / (n + 1.0))).astype(np.float32)
        self._params = (np.ascontiguousarray(self.refs_, dtype=np.float32), lut, self.t0_.astype(np.float32),
                        (1.0 / self.beta_).astype(np.float32),
                        (self.t0_ / self.beta_ + log_p0).astype(np.float32),  # beyond t0: s / beta - shift
                        np.ascontiguousarray(self.weights_, dtype=np.float32))

    def params(self) -> tuple:
        return self._params

    def infer_threshold(self, scores: np.ndarray, *, fpr: float) -> FisherEnsemble:
        """Set ``threshold_`` so that at most ``fpr`` of ``scores`` (clean) are over it."""
        self.threshold_ = self.threshold_at(scores, fpr)
        self.fpr_ = float(fpr)
        return self

    def to_profile(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(settings, tensors)``: method, tail share and threshold (JSON); the clean tail statistics."""
        if getattr(self, "threshold_", None) is None:
            raise RuntimeError("FisherEnsemble: call infer_threshold before saving")
        return ({"method": self.method, "tail_share": float(self.tail_share), "threshold": float(self.threshold_)},
                {"refs": self.refs_, "t0": self.t0_.astype(np.float64), "beta": self.beta_.astype(np.float64),
                 "weights": self.weights_.astype(np.float64)})

    @classmethod
    def from_profile(cls, settings: dict[str, Any], tensors: dict[str, np.ndarray], *, fpr: float) -> FisherEnsemble:
        e = cls(tail_share=float(settings["tail_share"]))
        e._validate()
        e.refs_ = np.ascontiguousarray(tensors["refs"], dtype=np.float32)
        e.t0_ = np.asarray(tensors["t0"], dtype=np.float64)
        e.beta_ = np.asarray(tensors["beta"], dtype=np.float64)
        # a profile without weights sums every check alike
        e.weights_ = np.asarray(tensors.get("weights", np.ones(len(e.refs_))), dtype=np.float64)
        e.threshold_, e.fpr_ = float(settings["threshold"]), float(fpr)
        e._prepare()
        return e


def separation_weights(clean: np.ndarray, anomalies: np.ndarray | None, *,
                       adaptive_rates: np.ndarray | None = None) -> np.ndarray:
    """``(n_checks,)`` each check's ``2 * AUROC - 1`` between ``clean`` and ``anomalies`` scores,
    floored at 0 and scaled so the largest is 1; all ones without anomalies or when none separates.

    With ``adaptive_rates`` (:func:`detection_rates` of the scores of inputs stamped with the scan's own
    adaptive key, :mod:`guard.scan.adaptive_key`: the share of them each check sees over its clean
    ``1 - ADAPTIVE_FPR`` quantile), each weight is also multiplied by ``ADAPTIVE_FLOOR`` plus its check's
    share relative to the largest share, and the products scaled so the largest is 1: a check the adapted trigger slips
    past keeps a third of its weight (the floor), so that a check which sees the real trigger and not the
    scan's stand-in still counts. Where no check sees the adaptive key (every share at most 0.05), the
    separation weights stand alone."""
    n_checks = clean.shape[1]
    if anomalies is None or len(anomalies) == 0:
        w = np.ones(n_checks)
    else:
        a = _scores(anomalies, n_checks, "anomalies")
        gini = np.array([2 * roc_auc(clean[:, j], a[:, j]) - 1 for j in range(n_checks)])
        gini = np.where(np.isfinite(gini), np.maximum(gini, 0.0), 0.0)
        w = gini / gini.max() if gini.max() > 0.05 else np.ones(n_checks)
    r = adaptive_rates
    if r is None or r.max() <= 0.05:
        return w
    both = w * (ADAPTIVE_FLOOR + r / r.max())  # w's largest is 1 and each factor at least the floor: max > 0
    return both / both.max()


#: The clean rate above which :func:`detection_rates` counts an adaptive input as seen by a check.
ADAPTIVE_FPR = 0.01

#: What a check keeps of its separation weight, relative to the check that sees the adaptive key best
#: (``ADAPTIVE_FLOOR / (1 + ADAPTIVE_FLOOR)``), when it sees none of it. Without a floor the product zeroed
#: the ``feature`` check on the DemoNet patch rows (the key is a blend it does not see) and cost them up to
#: 1.8 points of TPR@1%; at 0.5 they lose at most 0.5 and the ResNet-18 layout's evading key still gains 6
#: (figures: docs/benchmarks.md, 'The scan's own adaptive attacker').
ADAPTIVE_FLOOR = 0.5


def detection_rates(clean: np.ndarray, adaptive: np.ndarray) -> np.ndarray:
    """``(n_checks,)`` the share of ``adaptive`` scores over each check's clean upper ``ADAPTIVE_FPR`` quantile."""
    c = np.asarray(clean, dtype=np.float64)
    a = _scores(adaptive, c.shape[1], "adaptive")
    return np.array([float(np.mean(a[:, j] > upper_threshold(c[:, j], ADAPTIVE_FPR))) for j in range(c.shape[1])])


def _scores(a: np.ndarray, n_checks: int, what: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != n_checks:
        raise ValueError(f"{what} must be (M, {n_checks}) scores, got shape {a.shape}")
    return a


class UnionRule(_Rule):
    """The rule of profiles written before the ensemble: suspect when any check is over its threshold.

    ``statistic`` is the largest margin over a threshold relative to it, so ``threshold_ = 0`` gives
    exactly the union's decisions. It learns nothing from scores: :meth:`fit` only prepares the given
    thresholds (``UnionRule(thresholds).fit()``).

    Parameters
    ----------
    thresholds
        ``(n_checks,)`` each check's own threshold, as the profile stored it, in the checks' order.

    Attributes
    ----------
    thresholds_
        ``(n_checks,)`` float64, ``thresholds`` as an array.
    scale_
        ``(n_checks,)`` float64, each threshold's absolute value (floored at 1e-12), the margins' unit.
    threshold_
        0, the threshold on the statistic.
    """

    method = "union"
    kernel = union_statistic

    def __init__(self, thresholds: np.ndarray):
        self.thresholds = thresholds

    def fit(self, scores: np.ndarray | None = None) -> UnionRule:
        """Prepare the thresholds (``scores`` is accepted for the rules' common shape and not read)."""
        self.thresholds_ = np.asarray(self.thresholds, dtype=np.float64)
        self.scale_ = np.maximum(np.abs(self.thresholds_), 1e-12)
        self.threshold_ = 0.0
        return self

    def params(self) -> tuple:
        return (self.thresholds_, self.scale_)


RULES: dict[str, type[_Rule]] = {FisherEnsemble.method: FisherEnsemble}
"""The decision rules a profile can name (``ensemble.method``)."""
