"""The batch-1 hot path compiled with numba: pooling, every check's score and the ensemble in one call.

At batch 1 the guard's arithmetic is a few tens of thousands of multiply-adds, but numpy spends it
over about forty calls whose dispatch (about a microsecond each) is most of the guard's cost: 25 us of
a 0.15-0.2 ms forward pass on the demo net, in :class:`~guard.online.fused.FusedScorer` and the
ensemble. One compiled function does the same arithmetic in one pass. The numbers are the checks' own
(same formulas in float32, summed in another order, so they agree to rounding;
``tests/online/test_jit.py`` compares them with the per-check path) and the thresholds calibrated with
:meth:`Check.score` apply unchanged.

numba is optional (:mod:`guard._numba`): without it (or with ``GUARD_JIT=0`` in the environment) the
guard uses the numpy fused path, the same decisions a few tens of microseconds slower. Compiled code
is cached on disk where it can be (:func:`guard._numba.compiled`), so a serving worker compiles once
per machine, not per load.
"""

from __future__ import annotations

import numpy as np

from guard._numba import compiled, njit
from guard.online.ensemble import FisherEnsemble
from guard.online.fused import FusedScorer

SLOTS = ("feature", "neuron", "knn", "consistency", "overlap")
"""The kernel's fixed order of checks; ``slot[i]`` maps each to its column in the guard's order (-1: absent)."""


if njit is not None:

    # reassociation lets LLVM vectorise the dot products; no nnan/ninf: the code compares with inf
    @compiled(nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
    def score_one(x, logits, f, inner, slot, proj, dim, centres, bias, bank, starts, stops, k,
                  cproj, coffset, idx, p_s, m_s, c0, inv, refs, lut, t0, inv_beta, shift,
                  scores, contrib):  # pragma: no cover - compiled
        """Fill ``scores`` and ``contrib`` (n_checks,) for one input and return Fisher's statistic."""
        pred = 0
        for j in range(1, logits.shape[0]):
            if logits[j] > logits[pred]:
                pred = j
        d_in = f.shape[0]
        # feature (Mahalanobis) and neuron checks: one product with the stacked projection
        if slot[0] >= 0 or slot[1] >= 0:
            ncol = proj.shape[1]
            z = np.zeros(ncol, dtype=np.float32)
            for i in range(d_in):
                fi = f[i]
                for c in range(ncol):
                    z[c] += fi * proj[i, c]
            if slot[0] >= 0:
                acc = 0.0
                for c in range(dim):
                    dd = z[c] - centres[pred, c]
                    acc += dd * dd
                scores[slot[0]] = acc
            if slot[1] >= 0:
                best = -np.inf
                for c in range(dim, ncol):
                    v = z[c] + bias[c - dim]
                    if v > best:
                        best = v
                scores[slot[1]] = best
        # knn: k-th largest similarity to the predicted class's clean bank rows
        if slot[2] >= 0:
            a, b = starts[pred], stops[pred]
            top = np.full(k, -np.inf)  # the k largest, ascending
            for r in range(a, b):
                v = np.float32(0.0)
                for i in range(d_in):
                    v += f[i] * bank[r, i]
                if v > top[0]:
                    pos = 0
                    while pos + 1 < k and top[pos + 1] < v:
                        top[pos] = top[pos + 1]
                        pos += 1
                    top[pos] = v
            norm = 0.0
            for i in range(d_in):
                norm += np.float64(f[i]) * f[i]
            scores[slot[2]] = 1.0 - top[0] / max(np.sqrt(norm), 1e-12)
        # consistency: pooled inner block (channel means, then maxima) through the discriminant
        if slot[3] >= 0:
            n_ch, hw = inner.shape
            g = np.zeros(cproj.shape[1], dtype=np.float32)
            for ch in range(n_ch):
                s = np.float32(0.0)
                mx = np.float32(-np.inf)
                for q in range(hw):
                    v = inner[ch, q]
                    s += v
                    if v > mx:
                        mx = v
                mean = np.float32(s / hw)
                for c in range(g.shape[0]):
                    g[c] += mean * cproj[ch, c] + mx * cproj[n_ch + ch, c]
            low = np.inf
            for c in range(g.shape[0]):
                g[c] += coffset[c]
                if g[c] < low:
                    low = g[c]
            scores[slot[3]] = g[pred] - low
        # overlap: each suspect label's reversed pattern inside its mask support
        if slot[4] >= 0:
            best = 0.0
            for lab in range(p_s.shape[0]):
                raw = 0.0
                for q in range(idx.shape[0]):
                    raw += abs(np.float64(x[idx[q]]) - p_s[lab, q]) * m_s[lab, q]
                v = abs((c0[lab] - raw) * inv[lab])
                if v > best:
                    best = v
            scores[slot[4]] = best
        # Fisher's statistic over the clean tail probabilities (FisherEnsemble.contributions)
        n = refs.shape[1]
        stat = 0.0
        for j in range(scores.shape[0]):
            v = scores[j]
            if v > t0[j]:
                cj = v * inv_beta[j] - shift[j]
            else:
                lo, hi = 0, n  # bisect_left: the first reference >= v
                while lo < hi:
                    mid = (lo + hi) // 2
                    if refs[j, mid] < v:
                        lo = mid + 1
                    else:
                        hi = mid
                cj = lut[n - lo]
            contrib[j] = cj
            stat += np.float32(cj)
        return stat


class CompiledScorer:
    """One input's scores, ensemble contributions and statistic in one compiled call.

    Built on the arrays the numpy batch-1 path (:class:`~guard.online.fused.FusedScorer`) prepares
    from the guard's checks, and on its :class:`FisherEnsemble`; ``run(x, logits, features, inner)``
    takes the forward pass's arrays for one input (``inner`` the unpooled ``(1, C, H, W)``
    inner-layer activations, or None) and returns ``(scores, contributions, statistic)`` with the
    shapes of the numpy path: ``(1, n_checks)``, ``(1, n_checks)``, ``(1,)``.
    """

    def __init__(self, fused: FusedScorer, ensemble: FisherEnsemble):
        if njit is None:
            raise RuntimeError("numba is not available")
        knn = fused.knn_check
        if knn is not None and knn.starts is None:  # a profile from before the class-conditional bank
            raise TypeError("CompiledScorer needs the class-conditional knn bank")

        def f32(a, shape=(1,)):  # the kernel takes an array in every slot: a placeholder where absent
            return np.zeros(shape, np.float32) if a is None else np.ascontiguousarray(a, dtype=np.float32)

        self.n = len(fused.names)
        self._slot = np.array([fused.names.index(n) if n in fused.names else -1 for n in SLOTS], dtype=np.int64)
        self._proj, self._dim = f32(fused._proj, (1, 1)), int(fused._dim)
        self._centres, self._bias = f32(fused._centres, (1, 1)), f32(fused._bias)
        self._bank = f32(None if knn is None else knn.bank, (1, 1))
        self._starts = np.zeros(1, np.int64) if knn is None else np.ascontiguousarray(knn.starts, dtype=np.int64)
        self._stops = np.zeros(1, np.int64) if knn is None else np.ascontiguousarray(knn.stops, dtype=np.int64)
        self._k = 1 if knn is None else fused._k
        self._cproj, self._coffset = f32(fused._cproj, (1, 1)), f32(fused._coffset)
        self._idx = np.zeros(0, np.int64) if fused._idx is None else np.ascontiguousarray(fused._idx, dtype=np.int64)
        self._p_s, self._m_s = f32(fused._p, (1, 1)), f32(fused._m, (1, 1))
        self._c0, self._inv = f32(fused._c0), f32(fused._inv)
        self._refs = f32(ensemble.refs_)
        self._lut, self._t0 = f32(ensemble._lut), f32(ensemble._t0_32)
        self._inv_beta, self._shift = f32(ensemble._inv_beta), f32(ensemble._shift)
        self._no_inner = np.zeros((1, 1), np.float32)

    def run(self, x: np.ndarray, logits: np.ndarray, features: np.ndarray,
            inner: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores = np.empty((1, self.n), dtype=np.float32)
        contrib = np.empty((1, self.n), dtype=np.float32)
        inn = self._no_inner if inner is None else inner.reshape(inner.shape[1], -1)
        stat = score_one(x.reshape(-1), logits[0], features[0], inn, self._slot, self._proj, self._dim,
                         self._centres, self._bias, self._bank, self._starts, self._stops, self._k,
                         self._cproj, self._coffset, self._idx, self._p_s, self._m_s, self._c0, self._inv,
                         self._refs, self._lut, self._t0, self._inv_beta, self._shift, scores[0], contrib[0])
        return scores, contrib, np.array([stat], dtype=np.float32)
