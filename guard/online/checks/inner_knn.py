"""Nearest neighbours one block earlier: cosine distance to the k-th nearest clean inner-layer row of the class."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import register
from guard.online.checks.knn import KNNCheck, knn_distance
from guard.online.kernels import kernel


@kernel
def inner_knn_score(p, x, pred, f, g):
    """:func:`~guard.online.checks.knn.knn_distance` of the pooled inner-layer row."""
    return knn_distance(p, pred, g)


@register
class InnerKNNCheck(KNNCheck):
    """The nearest-neighbour check on the inner layer's pooled activations (each channel's spatial mean
    and max of the last convolutional block, the rows the consistency check reads): cosine distance
    to the ``k``-th nearest clean row *of the class the model predicts*.

    A trigger that changes the whole image mildly (Blended) leaves the last layer's features close to
    the target's clean ones, which is what it was trained for, while a block earlier the triggered
    input's activations form a mode no clean image of the target has; a class-conditional
    nearest-neighbour distance sees that mode where a single Gaussian per class (the consistency
    check's discriminant) blurs it. Tracking an input's neighbours over layers is the idea of TED
    (topological evolution dynamics) and deep k-NN, at the cost of hooks only: the inner layer is
    already tapped. On the benchmark's Blended model it separates triggered inputs far better than the
    feature-layer kNN check (figures: docs/benchmarks.md, 'Measurements behind the defaults').

    Parameters
    ----------
    k
        The neighbour the distance is read at; 5, as :class:`~guard.online.checks.knn.KNNCheck` (which
        describes how small classes are handled).
    max_bank
        Clean fit images whose inner-layer rows the bank holds at most (a seeded pick); 2000.
    seed
        Seeds the pick when there are more than ``max_bank`` fit images.

    Attributes
    ----------
    bank_rows_, starts_, stops_, k_, threshold_, fpr_
        As :class:`~guard.online.checks.knn.KNNCheck`'s, the bank holding inner-layer rows.
    """

    name = "inner_knn"
    kernel = inner_knn_score

    @staticmethod
    def rows(record) -> np.ndarray:
        """The inner layer's pooled activations (:func:`~guard.online.kernels.pool`)."""
        if record.inner is None:
            raise ValueError("the inner_knn check needs the inner layer's activations (Record.inner)")
        return record.inner
