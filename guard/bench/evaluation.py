"""Detection figures shared by every row of the benchmark, so that each is measured the same way.

Every online row (each guard check, the guard's combined verdict, STRIP, ART's STRIP) is scored on the
same clean and triggered inputs and reported as the AUROC and the TPR at the threshold that lets 1% of
the clean evaluation inputs through (:func:`guard.stats.tpr_at_fpr`: the same FPR point for every row,
whatever each method's own calibration would have chosen). Where a method has its own deployed
threshold (the guard's calibrated thresholds, STRIP's normal-fit boundary) its realised TPR and FPR
at that threshold are reported next to it, because that is what a user of the method gets.
"""

from __future__ import annotations

import math

import numpy as np

from guard.stats import roc_auc, tpr_at_fpr


def _r(v: float, nd: int = 4) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), nd)


def separation(neg: np.ndarray, pos: np.ndarray, *, fpr: float = 0.01) -> dict[str, float | None]:
    """AUROC and TPR at ``fpr`` (threshold from ``neg``) of scores where higher = more suspect."""
    return {"auroc": _r(roc_auc(neg, pos)), "tpr_at_1pct_fpr": _r(tpr_at_fpr(neg, pos, fpr))}


def at_threshold(neg_flag: np.ndarray, pos_flag: np.ndarray) -> dict[str, float | None]:
    """Realised TPR and FPR of binary decisions."""
    return {"tpr": _r(np.mean(pos_flag)), "fpr": _r(np.mean(neg_flag))}
