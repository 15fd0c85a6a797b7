"""Deep nearest neighbours: cosine distance to the k-th nearest clean feature vector of the predicted class."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, register
from guard.online.kernels import kernel, matvec


@kernel
def knn_distance(p, pred, f):
    """``1 - cos`` from the row ``f`` to the ``k``-th most similar bank row of class ``pred`` (its least
    similar where the class has fewer than ``k`` rows)."""
    bank, starts, stops, k = p
    sim = matvec(bank[starts[pred]:stops[pred]], f)  # cosine similarity times |f|: |f| does not change the order
    top = np.full(k, -np.inf, dtype=np.float32)  # the k largest, ascending: top[0] is the k-th
    for v in sim:
        if v > top[0]:
            pos = 0
            while pos + 1 < k and top[pos + 1] < v:
                top[pos] = top[pos + 1]
                pos += 1
            top[pos] = v
    kth = top[k - min(k, sim.shape[0])]  # the k-th most similar, or the least similar of fewer
    return 1.0 - kth / max(np.sqrt((f * f).sum()), 1e-12)


@kernel
def knn_score(p, x, pred, f, g):
    """:func:`knn_distance` of the feature row."""
    return knn_distance(p, pred, f)


@register
class KNNCheck(Check):
    """Label-agnostic, non-parametric: cosine distance from the input's features to its ``k``-th nearest
    clean feature vector *of the class the model predicts* (deep nearest neighbours, Sun et al., ICML
    2022, class-conditional as the Mahalanobis check is).

    Input-specific triggers (WaNet's warp, input-aware generators) move each input differently, so
    no reversed trigger or suspect neuron describes them, and a single Gaussian per class (the
    Mahalanobis check) blurs the several modes a class's clean features have. Backdoored inputs reach
    their label through features that no clean image of that label has; their nearest clean neighbour
    of the predicted class is far. The bank holds the L2-normalised features of at most ``max_bank``
    clean fit images (seeded pick), grouped by class: a score reads one class's rows only (a tenth of
    the bank for ten classes), one small product and a partial sort per input.

    Parameters
    ----------
    k
        The neighbour the distance is read at (the ``k``-th nearest of the class), 5: a single clean
        outlier in the bank does not vouch for an input. A class with fewer than ``k`` bank rows is read
        at its farthest row, and a class with none is compared with the whole bank. (Comparing every class
        under ``k`` rows with the whole bank would read classes of ``k`` to ``k / 0.8`` images one way in the
        cross-fitted calibration, whose folds hold four fifths of each class, and the other in the served
        check: at 100 classes with 5 images each that rejects 10% of held-out clean images at 1%;
        docs/benchmarks.md, 'Measurements behind the defaults'.)
    max_bank
        Clean fit images the bank holds at most (a seeded pick); 2000 bounds the profile's size and the
        per-input cost (a score reads one class's rows).
    seed
        Seeds the pick when there are more than ``max_bank`` fit images.

    Attributes
    ----------
    bank_rows_
        ``(M, D)`` float32, the L2-normalised clean rows, grouped by class (profile key ``bank_rows``).
    starts_, stops_
        ``(K,)`` int64, each class's rows in the bank (the whole bank for a class with none; profile
        keys ``starts``, ``stops``).
    k_
        The neighbour the distance is read at, ``k`` lowered to the bank's size (the profile's setting
        ``k``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).

    A check restored from a profile reports ``k`` as the profile's ``k``, ``max_bank`` as its bank's
    size and ``seed`` as 0.
    """

    name = "knn"
    kernel = knn_score
    STATE = ("bank_rows", "starts", "stops")
    SETTINGS = ("k",)

    def __init__(self, *, k: int = 5, max_bank: int = 2000, seed: int = 0):
        self.k = k
        self.max_bank = max_bank
        self.seed = seed

    @staticmethod
    def _unit(f: np.ndarray) -> np.ndarray:
        return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    @staticmethod
    def rows(record) -> np.ndarray:
        """The activations the bank holds and an input is compared on: the feature layer's."""
        return record.features

    def _fit(self, record, y):
        f = self.rows(record)
        labels = np.asarray(record.logits.argmax(1) if y is None else y, dtype=np.int64)
        max_bank, k = int(self.max_bank), int(self.k)
        if len(f) > max_bank:
            pick = np.sort(np.random.default_rng(int(self.seed)).choice(len(f), max_bank, replace=False))
            f, labels = f[pick], labels[pick]
        order = np.argsort(labels, kind="stable")
        self.bank_rows_ = np.ascontiguousarray(self._unit(f[order]))  # (M, D), rows grouped by class
        n_classes = record.logits.shape[1]
        edges = np.searchsorted(labels[order], np.arange(n_classes + 1))
        self.starts_, self.stops_ = edges[:-1].astype(np.int64), edges[1:].astype(np.int64)
        # a class with no clean image is compared with the whole bank; one with fewer than k is read at
        # its farthest row (knn_distance)
        empty = self.stops_ == self.starts_
        self.starts_[empty], self.stops_[empty] = 0, len(self.bank_rows_)
        self.k_ = int(min(max(k, 1), len(self.bank_rows_)))

    @classmethod
    def _profile_parameters(cls, settings, tensors):
        return {"k": int(settings["k"]), "max_bank": len(tensors["bank_rows"]), "seed": 0}

    def _restore(self):
        self.k_ = int(self.k_)

    def params(self):
        return (np.ascontiguousarray(self.bank_rows_, dtype=np.float32), np.asarray(self.starts_, np.int64),
                np.asarray(self.stops_, np.int64), int(self.k_))
