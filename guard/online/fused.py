"""Every check's score for a single input in a handful of numpy calls: the batch-1 hot path.

At batch 1 the checks' arithmetic is tiny (a few hundred multiply-adds each) and their cost is numpy's
per-call overhead: about 45 calls through the five ``Check.score`` methods. This scorer precomputes
what they share: one matrix product gives both the Mahalanobis projection and the suspect-neuron sums,
each class's knn bank is stored transposed and contiguous, and the overlap check's constants are
folded (``(1 - mu) - S`` times ``1 / sd``). The numbers are the checks' own (same operations in
float32, up to rounding; ``tests/online/test_guard.py`` compares them) so the thresholds calibrated
with ``Check.score`` apply unchanged. Batches of more than one input keep the per-check path, where
the calls are amortised.
"""

from __future__ import annotations

import numpy as np

from guard.online.checks import Check, ConsistencyCheck, FeatureCheck, KNNCheck, NeuronCheck, OverlapCheck


class FusedScorer:
    """Scores of one input for ``checks`` (in their order): ``score(x, logits, features, inner)``."""

    def __init__(self, checks: list[Check]):
        self.names = [c.name for c in checks]
        by_type = {type(c): c for c in checks}
        known = {FeatureCheck, KNNCheck, NeuronCheck, OverlapCheck, ConsistencyCheck}
        if len(by_type) != len(checks) or not set(by_type) <= known:
            raise TypeError("FusedScorer covers one each of the feature, knn, neuron, overlap and consistency checks")
        # every prepared array exists (None where its check is absent): CompiledScorer reads them too
        self._feature = by_type.get(FeatureCheck)
        neuron = by_type.get(NeuronCheck)
        self._neuron = neuron is not None
        mats = [c.whiten if c is self._feature else c.weights for c in (self._feature, neuron) if c is not None]
        self._proj = np.ascontiguousarray(np.hstack(mats), dtype=np.float32) if mats else None
        self._dim = self._feature.whiten.shape[1] if self._feature is not None else 0
        self._centres = self._feature.centres if self._feature is not None else None
        self._bias = neuron.bias if neuron is not None else None
        knn = self.knn_check = by_type.get(KNNCheck)
        self._knn = knn is not None
        self._banks = self._whole = None
        if knn is not None:
            if knn.starts is None:  # a profile from before the class-conditional bank
                self._whole = np.ascontiguousarray(knn.bank.T)
            else:
                self._banks = [np.ascontiguousarray(knn.bank[a:b].T) for a, b in zip(knn.starts, knn.stops)]
            self._k = int(knn.k)
        overlap = by_type.get(OverlapCheck)
        self._overlap = overlap is not None
        self._idx = self._p = self._m = self._c0 = self._inv = None
        if overlap is not None:
            self._idx = overlap._idx
            self._p = overlap._p_s
            self._m = overlap._m_s
            self._c0 = (1.0 - overlap.mu).astype(np.float32)
            self._inv = (1.0 / overlap.sd).astype(np.float32)
        cons = by_type.get(ConsistencyCheck)
        self._cons = cons is not None
        self._cproj, self._coffset = (cons.proj, cons.offset) if cons is not None else (None, None)
        self._slot = {n: i for i, n in enumerate(self.names)}

    def score(self, x: np.ndarray, logits: np.ndarray, features: np.ndarray,
              inner: np.ndarray | None = None) -> np.ndarray:
        """``(1, n_checks)`` float32 scores of one input: ``x`` (1, C, H, W), ``logits`` (1, K),
        ``features`` (1, D), ``inner`` (1, 2C') for the consistency check."""
        out = np.empty((1, len(self.names)), dtype=np.float32)
        f = features[0]
        pred = int(logits[0].argmax())
        slot = self._slot
        if self._proj is not None:
            z = f @ self._proj
            if self._feature is not None:
                d = z[:self._dim] - self._centres[pred]
                out[0, slot["feature"]] = d @ d
            if self._neuron:
                out[0, slot["neuron"]] = (z[self._dim:] + self._bias).max()
        if self._knn:
            sim = f @ (self._whole if self._banks is None else self._banks[pred])
            m = sim.shape[0]
            kth = np.partition(sim, m - self._k)[m - self._k]
            out[0, slot["knn"]] = 1.0 - kth / max(float(np.sqrt(f @ f)), 1e-12)
        if self._cons:
            g = inner[0] @ self._cproj + self._coffset
            out[0, slot["consistency"]] = g[pred] - g.min()
        if self._overlap:
            raw = (np.abs(x.reshape(-1).take(self._idx) - self._p) * self._m).sum(1)
            out[0, slot["overlap"]] = np.abs((self._c0 - raw) * self._inv).max()
        return out
