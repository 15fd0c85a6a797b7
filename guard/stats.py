"""Small statistics shared by the scans and the online checks: MAD anomaly index, thresholds, ROC."""

from __future__ import annotations

import numpy as np

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the std under normality


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``(N, K)``, shifted by each row's maximum so it cannot overflow."""
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def anomaly_index(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Neural Cleanse's anomaly index ``(median - v) / (1.4826 * MAD)`` of each value (> 0 below median).

    The median and MAD are the ``reference`` values' (a purified model's trigger norm judged against the
    original scan's unsuspected labels), by default ``values``' own."""
    v = np.asarray(values, dtype=np.float64)
    ref = v if reference is None else np.asarray(reference, dtype=np.float64)
    med = np.median(ref)
    mad = MAD_CONSISTENCY * np.median(np.abs(ref - med))
    if mad <= 0:
        mad = np.finfo(np.float64).eps
    return (med - v) / mad


def log_anomaly_index(values: np.ndarray) -> np.ndarray:
    """The anomaly index of ``log(values)``: norms are scale quantities, so one huge mask must not
    stretch the MAD enough to hide a trigger ten times cheaper than every other label."""
    return anomaly_index(np.log(np.maximum(np.asarray(values, dtype=np.float64), 1e-8)))


def family_threshold(threshold: float, n: int, *, per: int = 10) -> float:
    """The bar a minimum of ``n`` values must pass to be as unlikely by chance as one of ``per`` values
    passing ``threshold``: the normal tail beyond ``threshold``, shared by ``n / per`` times as many
    values (``threshold`` itself for ``n <= per``). 2.0 for 10 labels gives 2.84 at 100, 3.51 at 1000."""
    from statistics import NormalDist

    if n <= per:
        return float(threshold)
    tail = 1.0 - NormalDist().cdf(threshold)
    return float(NormalDist().inv_cdf(1.0 - tail * per / n))


def largest_other(values: np.ndarray) -> np.ndarray:
    """``(K,)``: for each label, the largest value among the *other* labels (``-inf`` when there is none).

    What "leading the pack" is measured against: DF-TND's dominance (a label's logit increase over
    the runner-up's) and the blend reversal's lead (the opacity it needs against the easiest other
    label's, through ``-largest_other(-needed)``).
    """
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(-v, kind="stable")
    first, second = v[order[0]], v[order[1]] if len(v) > 1 else -np.inf
    return np.where(np.arange(len(v)) == order[0], second, first)


def upper_threshold(scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold with at most ``fpr`` of ``scores`` strictly above it (higher = more suspect)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no calibration scores")
    k = int(np.floor(fpr * s.size))  # how many may exceed
    return float(s[s.size - 1 - k]) if k < s.size else float(s[0])


def tail_threshold(scores: np.ndarray, fpr: float, *, resolved: int = 10, top: float = 0.1) -> float:
    """:func:`upper_threshold`, extended past what ``scores`` resolve: where fewer than ``resolved`` scores would
    lie over the ``fpr`` quantile, an exponential tail fitted to the excesses over the ``1 - top`` quantile
    (peaks over threshold) is extrapolated to ``fpr``, and the larger of it and the empirical threshold (the
    maximum, by then) is returned. A threshold at 0.05% set from 200 clean images is otherwise their maximum,
    which a clean image exceeds about once in 200 (measured on the trigger memory's residual energy:
    0.2-1.2% of held-out glyphs over it, 0.01-0.23% over the extrapolated one)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    empirical = upper_threshold(s, fpr)
    if fpr * s.size >= resolved or s.size < 20:
        return empirical
    u = float(np.quantile(s, 1.0 - top))
    excess = s[s > u] - u
    if excess.size == 0:
        return empirical
    return max(empirical, u + float(excess.mean()) * float(np.log(top / fpr)))


def roc_auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve of scores where ``pos`` should be higher (ties count half)."""
    neg = np.asarray(neg, dtype=np.float64)
    pos = np.asarray(pos, dtype=np.float64)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=np.float64)
    sorted_v = allv[order]
    i = 0
    while i < len(sorted_v):  # average ranks of ties
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[neg.size:].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def tpr_at_fpr(neg: np.ndarray, pos: np.ndarray, fpr: float = 0.01) -> float:
    """Share of ``pos`` above the threshold that lets ``fpr`` of ``neg`` through."""
    thr = upper_threshold(neg, fpr)
    return float((np.asarray(pos) > thr).mean())
