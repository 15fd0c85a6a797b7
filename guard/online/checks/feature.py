"""Mahalanobis distance of the features to the clean centre of the predicted class."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, class_whitening, register
from guard.online.kernels import kernel, vecmat


@kernel
def feature_score(p, x, pred, f, g):
    """Squared distance of the whitened features to the predicted class's whitened centre."""
    whiten, centres = p
    d = vecmat(f, whiten) - centres[pred]
    return (d * d).sum()


@register
class FeatureCheck(Check):
    """Label-agnostic: Mahalanobis distance of the features to the clean mean of the predicted class,
    with one shrunk covariance shared by all classes (Lee et al., 2018). A backdoored input reaches
    its target label through features clean images of that label do not have, and this check needs
    no scan result, so a model where the scan found nothing still has a calibrated guard.

    Parameters
    ----------
    shrinkage
        Fixed shrinkage of the shared covariance towards its scaled identity, in [0, 1]; None (the
        default) uses Ledoit-Wolf's estimate from the clean features, which needs no tuning.

    Attributes
    ----------
    whiten_
        ``(D, D)`` float32, the whitening matrix of the shared covariance (profile key ``whiten``).
    centres_
        ``(K, D)`` float32, the whitened class centres (profile key ``centres``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).

    A check restored from a profile reports ``shrinkage`` as None: the profile stores what was learned.
    """

    name = "feature"
    kernel = feature_score
    STATE = ("whiten", "centres")

    def __init__(self, *, shrinkage: float | None = None):
        self.shrinkage = shrinkage

    def _fit(self, record, y):
        whiten, centres = class_whitening(record.features, record, y, shrinkage=self.shrinkage)
        self.whiten_ = whiten.astype(np.float32)
        self.centres_ = centres.astype(np.float32)

    def params(self):
        return (np.ascontiguousarray(self.whiten_, dtype=np.float32),
                np.ascontiguousarray(self.centres_, dtype=np.float32))
