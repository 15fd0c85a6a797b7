"""SCALE-UP (Guo et al., ICLR 2023): scaled prediction consistency, the benchmark's input-level peer.

"SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled Prediction
Consistency": multiply the input's pixel values by each factor of ``scales`` (the paper's 3, 5, 7,
9, 11), clip to the valid range [0, 1] and classify every amplified copy. A trigger's pixels dominate
the amplified image, so a poisoned input keeps its (target) label under amplification; a clean
input's label drifts. The score is the share of amplified copies whose label is the original one
(the paper's *data-free* variant). With a few clean images (the paper's *data-limited* variant) that
share is standardised by the mean and standard deviation of the clean images' consistency for the
same predicted class, since some classes are naturally more scale-stable than others. Higher = more
suspect in both; cost ``1 + len(scales)`` forwards per input.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from guard.bench.peers._common import probabilities

VARIANTS = ("data_free", "data_limited")


class ScaleUp:
    """SCALE-UP detector: ``fit(model, clean_x)``, ``score(x)`` (higher = more suspect).

    ``scales`` the pixel amplification factors, ``variant`` ``data_free`` (the consistency share) or
    ``data_limited`` (standardised per predicted class on the fit images), ``min_per_class`` clean
    images a class needs for its own statistics (fewer: the statistics of all clean images),
    ``max_fit`` how many clean images the statistics use at most (a seeded pick), ``batch_size`` images
    per forward pass. Learned: ``class_mean_``, ``class_std_`` (per class), ``clean_mean_``, ``clean_std_``.

    >>> import numpy as np, torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    >>> x = np.random.default_rng(0).random((40, 3, 4, 4), dtype=np.float32)
    >>> s = ScaleUp().fit(net, x).score(x[:3])
    >>> s.shape, bool(((s >= 0) & (s <= 1)).all()), ScaleUp().forwards_per_input
    ((3,), True, 6)
    """

    def __init__(self, *, scales: tuple[float, ...] = (3, 5, 7, 9, 11), variant: str = "data_free",
                 min_per_class: int = 5, max_fit: int = 1000, batch_size: int = 500, seed: int = 0):
        self.scales = scales
        self.variant = variant
        self.min_per_class = min_per_class
        self.max_fit = max_fit
        self.batch_size = batch_size
        self.seed = seed

    @property
    def forwards_per_input(self) -> int:
        return 1 + len(self.scales)

    def fit(self, model: nn.Module, clean_x: np.ndarray) -> ScaleUp:
        """Keep ``model``; learn the clean images' consistency per predicted class (the data-limited statistics)."""
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        self.model_ = model
        x = np.ascontiguousarray(clean_x, dtype=np.float32)
        if len(x) > self.max_fit:
            x = x[np.sort(np.random.default_rng(self.seed).choice(len(x), self.max_fit, replace=False))]
        spc, pred = self.consistency(x)
        k = int(probabilities(model, x[:1]).shape[1])
        self.clean_mean_, self.clean_std_ = float(spc.mean()), float(max(spc.std(), 1e-3))
        self.class_mean_ = np.full(k, self.clean_mean_)
        self.class_std_ = np.full(k, self.clean_std_)
        for c in range(k):
            v = spc[pred == c]
            if len(v) >= self.min_per_class:
                self.class_mean_[c], self.class_std_[c] = v.mean(), max(v.std(), 1e-3)
        return self

    def consistency(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(share of amplified copies keeping the label, original label)`` of every input."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        pred = probabilities(self.model_, x, batch_size=self.batch_size).argmax(1)
        same = np.zeros(len(x), dtype=np.float64)
        for s in self.scales:
            scaled = np.clip(x * np.float32(s), 0.0, 1.0)
            same += probabilities(self.model_, scaled, batch_size=self.batch_size).argmax(1) == pred
        return same / len(self.scales), pred

    def score_variants(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Both variants' ``(N,)`` scores from one set of forward passes."""
        spc, pred = self.consistency(x)
        return {"data_free": spc, "data_limited": (spc - self.class_mean_[pred]) / self.class_std_[pred]}

    def score(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` scaled prediction consistency (data-free) or its per-class standard score (data-limited)."""
        return self.score_variants(x)[self.variant]
