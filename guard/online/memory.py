"""A stateful check: a trigger is the same on every query that carries it, clean images are not.

Every backdoor whose trigger is one fixed pattern (a patch, a blended key, a key re-optimised by an
attacker who knows the per-input checks) pastes the *same* pixels into every query it attacks, while
the content around it changes. The high-frequency residual of an image (each pixel minus the median of
its 3 x 3 neighbourhood) keeps a blended key almost whole and most of a glyph's or photo's content out,
so two triggered queries' residuals correlate where two clean queries' hardly do. The memory keeps the
residuals of the last ``size`` queries the guard saw and scores a new query by its ``matches``-th largest
cosine similarity to them (default 3: the query must repeat three remembered queries); a near-duplicate of a
remembered query (the same image sent again, consecutive video frames) is not counted, since its content
matches too. Why three and not one: clean images that share part of their pixels exactly (crops of one
photo, a fixed camera's background) match one remembered query now and then, which makes the largest
similarity's tail heavy and impossible to calibrate at a small FPR from a few hundred images, while a
trigger that an attacker sends often matches many; measured in docs/benchmarks.md ('The trigger memory's
calibration').

A backdoor's triggered queries all reach its target label, and the scan names the suspect labels: the
memory can ``watch`` just those (``labels``). It still remembers every query (the replayed calibration
holds for a memory of the traffic's mix), but only a query the model assigns to a watched label is
compared and can be rejected, so the clean traffic of other labels pays no false alarms and no product.

An attacker who knows this adds fresh noise to every query, so that what its queries share drowns in
what they do not. To drown the trigger's residual the noise must be as strong in the same band, and
clean images are smooth there: so a watched query whose residual is stronger than clean images' is
rejected as well (``energy``: the residual's root mean square, calibrated on clean images). Clean images'
RMS has a long tail (their edges and texture), so strong noise also raises the residual's *floor* (``floor``:
its median absolute value, which edges do not move), calibrated the same way; a watched query is rejected when
either is over its threshold. On the bench's Adap-Blend key the similarity catches the queries up to noise of
+-0.125 and the energy from +-0.125 on; a fainter key leaves a gap between the two (docs/benchmarks.md,
'Adaptive attackers').

An attacker who knows the residual smooths its key out of it (a key smooth over 3 x 3 pixels leaves the
residual alone). So the memory has a second band (``coarse``, default 2): the same memory, with positions
of its own, on the images average-pooled by two, where a key smoothed at the pixel scale is sharp again; a
query's score is the larger of the two bands' and one threshold holds both (each band's pairs calibrated at
half the similarity's share). To leave both bands nothing, a key must be smooth over about 6 x 6 pixels,
which costs the bench's gray-box attacker part of its attack success (docs/benchmarks.md, 'The coarse band').

What it cannot see: the first ``matches`` triggered queries (nothing to match yet), triggers that change with the
input (WaNet's warp moves each image's own edges; input-aware generators), a trigger smooth enough to
leave the high-frequency residual alone, and a trigger too rare in the traffic to be among the
remembered queries. It is per process: a serving worker remembers its own share of the traffic.

The residual is read at ``n_features`` pixel-channel positions drawn from ``seed`` when the memory is
fitted (a deployment's secret: an attacker without the profile cannot tell which pixels are compared).
``infer_threshold`` sets the thresholds of the similarity (half of ``fpr`` of clean queries through) and of the
energy and the floor (a quarter each): the similarity's from every pair of the clean images (how often two clean images
match, and so how often a clean query matches ``matches`` of ``size`` remembered ones) and from a replay of
them against a memory of other clean images, whichever is higher.

>>> import numpy as np
>>> from guard.demo.glyphs import glyphs
>>> clean, _ = glyphs(300, seed=0)
>>> mem = TriggerMemory(size=64).fit(clean[:200]).infer_threshold(clean[200:], fpr=0.01)
>>> key = np.random.default_rng(0).random(clean.shape[1:], dtype=np.float32)
>>> triggered = (0.75 * clean[:20] + 0.25 * key).astype(np.float32)
>>> _ = mem.update(triggered[:3])  # three triggered queries seen
>>> bool((mem.score(triggered[3:]) > mem.threshold_).mean() > 0.9)
True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

import numpy as np

from guard import _numba

MAX_FEATURES = 131072
"""The most positions a memory compares: two int8 rows' product is summed in int32 (127 * 127 * 131072 < 2 ** 31)."""

FLOOR_STRIDE = 6
"""Every this many of the drawn positions give the residual's noise floor (:meth:`TriggerMemory.floor`): 256 of the
default 1536, spread over the image, enough for a median."""

MIN_FLOOR_THRESHOLD = 1 / 255
"""The noise floor's threshold is at least one 8-bit step: clean images that are flat almost everywhere (synthetic
renders, scans) have a floor of 0, and a threshold of 0 would reject any query with the least noise."""

PAIR_IMAGES = 3000
"""Calibration images whose pairs :meth:`TriggerMemory.infer_threshold` measures (evenly spaced past that:
3000 images hold 4.5 million pairs, a 36 MB similarity matrix)."""


def _numpy_rows(flat: np.ndarray, index: np.ndarray, neighbours: np.ndarray, shape: tuple[int, int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The residual at ``index`` (pixel minus its 3 x 3 neighbourhood's median) and the 4 x 4-pooled content."""
    n = len(flat)
    c, h, w = shape
    res = flat[:, index] - np.partition(flat[:, neighbours], 4, axis=2)[:, :, 4]
    x = flat.reshape(n, c, h, w)
    pooled = x[:, :, : h - h % 4, : w - w % 4].reshape(n, c, 4, h // 4, 4, w // 4).mean((3, 5))
    return res, pooled.reshape(n, -1).astype(np.float32)


if _numba.njit is not None:

    @_numba.compiled(inline="always")
    def _median9(v0, v1, v2, v3, v4, v5, v6, v7, v8):  # pragma: no cover - compiled
        """The median of nine values: a branch-free 19-exchange network."""
        v1, v2 = min(v1, v2), max(v1, v2)
        v4, v5 = min(v4, v5), max(v4, v5)
        v7, v8 = min(v7, v8), max(v7, v8)
        v0, v1 = min(v0, v1), max(v0, v1)
        v3, v4 = min(v3, v4), max(v3, v4)
        v6, v7 = min(v6, v7), max(v6, v7)
        v1, v2 = min(v1, v2), max(v1, v2)
        v4, v5 = min(v4, v5), max(v4, v5)
        v7, v8 = min(v7, v8), max(v7, v8)
        v0, v3 = min(v0, v3), max(v0, v3)
        v5, v8 = min(v5, v8), max(v5, v8)
        v4, v7 = min(v4, v7), max(v4, v7)
        v3, v6 = min(v3, v6), max(v3, v6)
        v1, v4 = min(v1, v4), max(v1, v4)
        v2, v5 = min(v2, v5), max(v2, v5)
        v4, v7 = min(v4, v7), max(v4, v7)
        v4, v2 = min(v4, v2), max(v4, v2)
        v6, v4 = min(v6, v4), max(v6, v4)
        return min(v4, v2)

    @_numba.compiled(nogil=True, fastmath=True)
    def _dense_residual(row, index, pad, med, out, c, h, w):  # pragma: no cover - compiled
        img = row.reshape(c, h, w)
        pad[:, 1:-1, 1:-1] = img
        pad[:, 0, 1:-1] = img[:, 0]
        pad[:, -1, 1:-1] = img[:, -1]
        pad[:, :, 0] = pad[:, :, 1]
        pad[:, :, -1] = pad[:, :, -2]
        for ch in range(c):
            for i in range(h):
                a, b, d, o = pad[ch, i], pad[ch, i + 1], pad[ch, i + 2], med[ch, i]
                for j in range(w):
                    o[j] = _median9(a[j], a[j + 1], a[j + 2], b[j], b[j + 1], b[j + 2], d[j], d[j + 1], d[j + 2])
        flat_med = med.reshape(-1)
        for p in range(index.shape[0]):
            out[p] = row[index[p]] - flat_med[index[p]]

    @_numba.compiled(nogil=True, fastmath=True)
    def _rows_kernel(flat, index, neighbours, c, h, w):  # pragma: no cover - compiled
        n, f = flat.shape[0], index.shape[0]
        res = np.empty((n, f), np.float32)
        pooled = np.zeros((n, c * 16), np.float32)
        bh, bw = h // 4, w // 4
        # dense draws (a small image): the 3 x 3 median of every pixel, on a copy with the edges replicated so
        # that the loop over a row is branch-free and vectorises, then the residual at the drawn positions (on
        # 32 x 32 inputs four times cheaper than gathering each position's nine neighbours); sparse draws (a
        # large image): each drawn position's neighbours gathered
        dense = 8 * f >= c * h * w
        pad = np.empty((c, h + 2, w + 2) if dense else (1, 1, 1), np.float32)
        med = np.empty((c, h, w) if dense else (1, 1, 1), np.float32)
        for k in range(n):
            row = flat[k]
            if not dense:
                for p in range(f):
                    nb = neighbours[p]
                    res[k, p] = row[index[p]] - _median9(row[nb[0]], row[nb[1]], row[nb[2]], row[nb[3]], row[nb[4]],
                                                         row[nb[5]], row[nb[6]], row[nb[7]], row[nb[8]])
            else:
                _dense_residual(row, index, pad, med, res[k], c, h, w)
            for ch in range(c):
                for bi in range(4):
                    for bj in range(4):
                        total = np.float32(0.0)
                        for i in range(bi * bh, (bi + 1) * bh):
                            start = ch * h * w + i * w + bj * bw
                            for j in range(start, start + bw):
                                total += row[j]
                        pooled[k, ch * 16 + bi * 4 + bj] = total / max(bh * bw, 1)
        return res, pooled

    @_numba.compiled(nogil=True, fastmath=True)
    def _unit_kernel(v):  # pragma: no cover - compiled
        out = np.empty(v.shape, np.float32)
        norms = np.empty(v.shape[0], np.float32)
        for k in range(v.shape[0]):
            mean = np.float32(v[k].mean())
            norm = np.float32(0.0)
            for p in range(v.shape[1]):
                out[k, p] = v[k, p] - mean
                norm += out[k, p] * out[k, p]
            norms[k] = np.sqrt(norm)
            out[k] /= max(norms[k], np.float32(1e-8))
        return out, norms

    @_numba.compiled(nogil=True, fastmath=True)
    def _against_kernel(res, scale, content, mem_res, mem_scale, mem_content, duplicate, matches
                        ):  # pragma: no cover - compiled
        out = np.empty(res.shape[0], np.float32)
        top = np.empty(matches, np.float32)  # the largest similarities so far, in falling order
        dots = np.empty(mem_res.shape[0], np.int32)
        for k in range(res.shape[0]):
            row = res[k]
            # the int8 products first, in a loop of their own: LLVM vectorises it only so (three times faster)
            for m in range(mem_res.shape[0]):
                dot = np.int32(0)
                for p in range(row.shape[0]):
                    dot += np.int32(row[p]) * np.int32(mem_res[m, p])
                dots[m] = dot
            top[:] = np.float32(-1.0)
            for m in range(mem_res.shape[0]):
                same = np.float32(0.0)
                for p in range(content.shape[1]):
                    same += content[k, p] * mem_content[m, p]
                if same > duplicate:  # the same image sent again: its content matches too
                    continue
                sim = np.float32(dots[m]) * scale[k] * mem_scale[m]
                j = matches - 1
                if sim > top[j]:
                    while j > 0 and top[j - 1] < sim:
                        top[j] = top[j - 1]
                        j -= 1
                    top[j] = sim
            out[k] = top[matches - 1]
        return out

    def _raw_rows(flat: np.ndarray, index: np.ndarray, neighbours: np.ndarray, shape: tuple[int, int, int]
                  ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_numpy_rows` in one compiled pass over each image."""
        return _rows_kernel(np.ascontiguousarray(flat), index, neighbours, *shape)

    def _unit(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_numpy_unit`, compiled."""
        return _unit_kernel(np.ascontiguousarray(v, dtype=np.float32))

    @_numba.compiled(nogil=True, fastmath=True)
    def _quantize_kernel(v):  # pragma: no cover - compiled
        q = np.empty(v.shape, np.int8)
        scale = np.empty(v.shape[0], np.float32)
        for k in range(v.shape[0]):
            top = np.float32(0.0)
            for p in range(v.shape[1]):
                top = max(top, abs(v[k, p]))
            scale[k] = top / np.float32(127.0) if top > 0 else np.float32(1.0)
            inv = np.float32(1.0) / scale[k]
            for p in range(v.shape[1]):
                q[k, p] = np.int8(np.rint(v[k, p] * inv))
        return q, scale

    @_numba.compiled(nogil=True, fastmath=True)
    def _floor_kernel(res):  # pragma: no cover - compiled
        n, f = res.shape
        out = np.empty(n, np.float32)
        sub = np.empty((f + FLOOR_STRIDE - 1) // FLOOR_STRIDE, np.float32)
        for k in range(n):
            mean = np.float32(res[k].mean())
            for i in range(sub.shape[0]):
                sub[i] = abs(res[k, i * FLOOR_STRIDE] - mean)
            out[k] = np.median(sub)
        return out

    @_numba.compiled(nogil=True, fastmath=True)
    def _unit_rows_kernel(flat, index, neighbours, c, h, w):  # pragma: no cover - compiled
        res, pooled = _rows_kernel(flat, index, neighbours, c, h, w)
        floor = _floor_kernel(res)
        unit_res, norms = _unit_kernel(res)
        unit_pooled, _ = _unit_kernel(pooled)
        q, scale = _quantize_kernel(unit_res)
        return q, scale, unit_pooled, norms / np.float32(np.sqrt(res.shape[1])), floor

    def _unit_rows(flat: np.ndarray, index: np.ndarray, neighbours: np.ndarray, shape: tuple[int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:func:`_numpy_unit_rows` in one compiled call."""
        return _unit_rows_kernel(np.ascontiguousarray(flat), index, neighbours, *shape)

    @_numba.compiled(nogil=True, fastmath=True)
    def _check_kernel(flat, index, neighbours, c, h, w, watch, mem_res, mem_scale, mem_content, ring, duplicate,
                      matches, floor_scale):  # pragma: no cover - compiled
        res, scale, content, energy, floor = _unit_rows_kernel(flat, index, neighbours, c, h, w)
        size = mem_res.shape[0]
        sim = np.zeros(res.shape[0], np.float32)
        for i in range(res.shape[0]):
            filled, nxt = ring[0], ring[1]
            if not watch[i]:
                energy[i] = np.float32(0.0)
            else:  # the residual's strength as scored: its RMS, or its noise floor in the RMS threshold's units
                energy[i] = max(energy[i], floor[i] * floor_scale)
            if watch[i] and filled > 0:
                sim[i] = _against_kernel(res[i:i + 1], scale[i:i + 1], content[i:i + 1], mem_res[:filled],
                                         mem_scale[:filled], mem_content[:filled], duplicate, matches)[0]
            mem_res[nxt] = res[i]
            mem_scale[nxt] = scale[i]
            mem_content[nxt] = content[i]
            ring[1] = (nxt + 1) % size
            ring[0] = min(filled + 1, size)
        return sim, energy
else:  # pragma: no cover - without numba
    _raw_rows = _numpy_rows


def _numpy_pool(x: np.ndarray, factor: int) -> np.ndarray:
    """``(N, C, H // factor, W // factor)``: each image average-pooled by ``factor`` (the edge remainder dropped)."""
    x = np.asarray(x, dtype=np.float32)
    n, c, h, w = x.shape
    h, w = h - h % factor, w - w % factor
    return x[:, :, :h, :w].reshape(n, c, h // factor, factor, w // factor, factor).mean((3, 5), dtype=np.float32)


if _numba.njit is not None:

    @_numba.compiled(nogil=True, fastmath=True)
    def _pool_kernel(x, factor):  # pragma: no cover - compiled
        n, c, h, w = x.shape
        ho, wo = h // factor, w // factor
        out = np.empty((n, c, ho, wo), np.float32)
        scale = np.float32(1.0 / (factor * factor))
        for k in range(n):
            for ch in range(c):
                for i in range(ho):
                    o = out[k, ch, i]
                    o[:] = np.float32(0.0)
                    for di in range(factor):  # rows of the input, each summed into the output row by factor
                        r = x[k, ch, i * factor + di]
                        for j in range(wo):
                            for dj in range(factor):
                                o[j] += r[j * factor + dj]
                    for j in range(wo):
                        o[j] *= scale
        return out

    @_numba.compiled(nogil=True, fastmath=True)
    def _check_bands_kernel(flat, index, neighbours, c, h, w, watch, mem_res, mem_scale, mem_content, ring,
                            coarse_index, coarse_neighbours, factor, coarse_res, coarse_scale, coarse_content,
                            coarse_ring, duplicate, matches, floor_scale):  # pragma: no cover - compiled
        sim, energy = _check_kernel(flat, index, neighbours, c, h, w, watch, mem_res, mem_scale, mem_content, ring,
                                    duplicate, matches, floor_scale)
        n, ho, wo = flat.shape[0], h // factor, w // factor
        pooled = _pool_kernel(flat.reshape(n, c, h, w), factor).reshape(n, c * ho * wo)
        coarse, _ = _check_kernel(pooled, coarse_index, coarse_neighbours, c, ho, wo, watch, coarse_res,
                                  coarse_scale, coarse_content, coarse_ring, duplicate, matches, np.float32(0.0))
        for i in range(n):
            sim[i] = max(sim[i], coarse[i])
        return sim, energy

    def _pool(x: np.ndarray, factor: int) -> np.ndarray:
        """:func:`_numpy_pool`, compiled (numpy's strided mean takes about 30 us per 3x32x32 image)."""
        return _pool_kernel(np.ascontiguousarray(x, dtype=np.float32), factor)
else:  # pragma: no cover - without numba
    _pool = _numpy_pool


def _similarities(res: np.ndarray, scale: np.ndarray, content: np.ndarray, mem_res: np.ndarray,
                  mem_scale: np.ndarray, mem_content: np.ndarray, duplicate: float) -> np.ndarray:
    """Each quantised row's residual similarity to each remembered row, -1 where the contents match (a re-sent
    image)."""
    sim = _dequantize(res, scale) @ _dequantize(mem_res, mem_scale).T
    sim[content @ mem_content.T > duplicate] = -1.0
    return sim


def _kth_largest(sim: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k``-th largest value (-1 for a row of fewer than ``k`` values)."""
    if sim.shape[1] < k:
        return np.full(len(sim), -1.0, dtype=np.float32)
    return np.partition(sim, sim.shape[1] - k, axis=1)[:, sim.shape[1] - k].astype(np.float32)


def pair_threshold(pairs: np.ndarray, *, size: int, matches: int, alpha: float) -> float:
    """The smallest similarity ``t`` at which a clean query, compared with ``size`` remembered clean ones, has
    at most an ``alpha`` chance of matching ``matches`` or more of them (binomial in ``size`` draws), each
    pair matching at the rate measured on ``pairs`` (every distinct pair of the calibration images).

    A query's score is a largest-of-``size`` (or ``matches``-th largest) statistic, so its tail is set by
    the far tail of the pairs: replaying a few hundred images resolves only their own count's quantile, while
    ``n`` images hold ``n (n - 1) / 2`` pairs."""
    from scipy.stats import binom

    v = np.sort(np.asarray(pairs, dtype=np.float64))[::-1]
    n = len(v)
    if n == 0:
        raise ValueError("no pairs of distinct calibration images")
    lo, hi = 0, n - 1  # v[j] has j pairs above it; the largest j whose rate j / n still holds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if binom.sf(matches - 1, size, mid / n) <= alpha:
            lo = mid
        else:
            hi = mid - 1
    return float(v[lo])


def _numpy_unit(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row centred and scaled to unit length (cosine similarity becomes a dot product), and the centred
    rows' lengths."""
    v = v - v.mean(1, keepdims=True)
    norms = np.linalg.norm(v, axis=1)
    return (v / np.maximum(norms, 1e-8)[:, None]).astype(np.float32), norms.astype(np.float32)


def _numpy_quantize(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row as int8 and its scale (``q * scale`` is the row to half a step): a remembered row takes a quarter
    of the memory, so that 256 of them stay in a core's cache beside the model (measured in docs/benchmarks.md,
    'Cost')."""
    top = np.abs(v).max(1)
    scale = np.where(top > 0, top / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    return np.rint(v * (np.float32(1.0) / scale)[:, None]).astype(np.int8), scale


def _dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float rows that int8 rows ``q`` and their scales stand for."""
    return q.astype(np.float32) * scale[:, None]


def _numpy_floor(res: np.ndarray) -> np.ndarray:
    """``(N,)`` each residual row's noise floor: the median absolute value of the centred residual at every
    :data:`FLOOR_STRIDE`-th position."""
    centred = res - res.mean(1, keepdims=True, dtype=np.float32)
    return np.median(np.abs(centred[:, ::FLOOR_STRIDE]), axis=1).astype(np.float32)


def _numpy_unit_rows(flat: np.ndarray, index: np.ndarray, neighbours: np.ndarray, shape: tuple[int, int, int]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The unit residual rows quantised (int8 and a scale per row), the unit pooled-content rows, each
    residual's root mean square and its noise floor (:func:`_numpy_floor`)."""
    res, pooled = _raw_rows(flat, index, neighbours, shape)
    (unit_res, norms), (unit_pooled, _) = _unit(res), _unit(pooled)
    return (*_numpy_quantize(unit_res), unit_pooled, norms / np.float32(np.sqrt(res.shape[1])), _numpy_floor(res))


if _numba.njit is None:  # pragma: no cover - without numba
    _unit = _numpy_unit
    _unit_rows = _numpy_unit_rows


class TriggerMemory:
    """The repeated-trigger check: ``fit`` on clean images, ``infer_threshold(x, fpr=...)``, then per batch
    ``score(x)`` (the ``matches``-th largest residual similarity to the remembered queries, higher = more
    suspect) and ``update(x)`` (remember them); :meth:`observe` does both, comparing each input with the memory and
    with the inputs before it in the same batch.

    Parameters
    ----------
    size:
        How many recent queries are remembered (a ring buffer).
    n_features:
        Pixel-channel positions of the residual compared (drawn at ``fit`` from ``seed``).
    duplicate:
        Content similarity (cosine of the centred, 4x4-pooled images) over which a remembered query counts
        as the same image and is ignored.
    seed:
        Draws the positions; keep it with the deployment, not in public configuration.
    labels:
        The watched labels (``None``: every label). Only a query whose predicted label is watched is
        compared and scored; the others score 0 and are remembered all the same.
    matches:
        How many remembered queries a query must repeat: its score is its ``matches``-th largest similarity.
    coarse:
        Pooling factor of the second band (None: the pixel band only; images whose pooled side would be under
        3 pixels have no second band). Learned: ``coarse_``, the second band's memory (seed ``seed + 1``).

    Learned: ``index_`` (the positions, flat in ``(C, H, W)``), ``neighbours_`` (their 3 x 3 neighbourhoods,
    flat in ``(C, H, W)``, edges replicated), ``threshold_`` (the similarity's), ``energy_threshold_``,
    ``floor_threshold_`` and ``fpr_`` (all together).
    """

    def __init__(self, *, size: int = 256, n_features: int = 1536, duplicate: float = 0.98, seed: int = 0,
                 labels: Iterable[int] | None = None, matches: int = 3, coarse: int | None = 2):
        if not 1 <= int(matches) <= int(size):
            raise ValueError(f"matches must be between 1 and size ({size}), got {matches}")
        if not 1 <= int(n_features) <= MAX_FEATURES:
            raise ValueError(f"n_features must be between 1 and {MAX_FEATURES}, got {n_features}")
        if coarse is not None and int(coarse) < 2:
            raise ValueError(f"coarse must be a pooling factor >= 2 or None, got {coarse}")
        self.size = size
        self.matches = int(matches)
        self.coarse = None if coarse is None else int(coarse)
        self.n_features = n_features
        self.duplicate = duplicate
        self.seed = seed
        self.labels = None if labels is None else tuple(sorted({int(v) for v in labels}))

    def fit(self, x: np.ndarray) -> TriggerMemory:
        """Draw the compared positions for images shaped like ``x`` and start with an empty memory."""
        c, h, w = (int(v) for v in x.shape[1:])
        rng = np.random.default_rng(self.seed)
        self.index_ = np.sort(rng.choice(c * h * w, size=min(self.n_features, c * h * w), replace=False))
        ch, i, j = np.unravel_index(self.index_, (c, h, w))
        di, dj = np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing="ij")  # edges replicated
        self.neighbours_ = np.ravel_multi_index((ch[:, None], np.clip(i[:, None] + di.ravel(), 0, h - 1),
                                                 np.clip(j[:, None] + dj.ravel(), 0, w - 1)), (c, h, w))
        self._shape = (c, h, w)
        # thresholds from before this fit no longer hold
        for stale in ("threshold_", "energy_threshold_", "floor_threshold_", "fpr_"):
            self.__dict__.pop(stale, None)
        self.coarse_ = None  # the second band: the same memory on images pooled by `coarse`
        if self.coarse is not None and min(h, w) // self.coarse >= 3:
            self.coarse_ = TriggerMemory(size=self.size, n_features=self.n_features, duplicate=self.duplicate,
                                         seed=self.seed + 1, labels=self.labels, matches=self.matches,
                                         coarse=None).fit(_pool(x[:1], self.coarse))
        self.reset()
        return self

    def reset(self) -> TriggerMemory:
        """Forget every remembered query."""
        self._res = np.zeros((self.size, len(self.index_)), dtype=np.int8)  # quantised unit residuals
        self._scale = np.ones(self.size, dtype=np.float32)
        self._content = np.zeros((self.size, self._shape[0] * 16), dtype=np.float32)
        self._ring = np.zeros(2, dtype=np.int64)  # how many rows are filled, where the next one goes
        self._lock = threading.Lock()  # one memory per serving worker; its threads take turns
        if self.coarse_ is not None:
            self.coarse_.reset()
        return self

    def residual(self, x: np.ndarray) -> np.ndarray:
        """``(N, n_features)`` the high-frequency residual at the drawn positions: pixel minus its 3 x 3
        neighbourhood's median (edges replicated)."""
        return self._raw(x)[0]

    def _raw(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        return _raw_rows(flat, self.index_, self.neighbours_, self._shape)

    def _rows(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._rows_energy(x)[:3]

    def _rows_energy(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        flat = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        return _unit_rows(flat, self.index_, self.neighbours_, self._shape)

    def energy(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` the root mean square of each input's centred residual at the drawn positions."""
        return self._rows_energy(x)[3]

    def floor(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` each input's noise floor: the median absolute centred residual at every
        :data:`FLOOR_STRIDE`-th drawn position. Edges and texture raise the root mean square of a clean image's
        residual but not its median; noise spread over the whole image raises both."""
        return self._rows_energy(x)[4]

    def residual_noise(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` the energy as :meth:`check` scores it: the larger of :meth:`energy` and :meth:`floor` scaled
        into the energy threshold's units (``energy_threshold_ / floor_threshold_``)."""
        rows = self._rows_energy(x)
        return np.maximum(rows[3], rows[4] * self._floor_scale)

    @property
    def _floor_scale(self) -> np.float32:
        """``energy_threshold_ / floor_threshold_``: a floor over its threshold scores over the energy's (0 for a
        memory calibrated before the floor, or without an energy threshold)."""
        e, f = getattr(self, "energy_threshold_", math.inf), getattr(self, "floor_threshold_", math.inf)
        return np.float32(e / f if math.isfinite(e) and math.isfinite(f) and f > 0 else 0.0)  # on every check

    def watched(self, labels: np.ndarray | None, n: int) -> np.ndarray:
        """``(n,)`` which inputs, predicted ``labels``, the memory compares (all when it watches every label)."""
        if self.labels is None:
            return np.ones(n, dtype=bool)
        if labels is None:
            raise ValueError("this memory watches some labels only: pass the inputs' predicted labels")
        if n == 1:  # the serving path: one query
            return np.array([int(np.asarray(labels).reshape(-1)[0]) in self.labels])
        return np.fromiter((int(v) in self.labels for v in np.asarray(labels).reshape(-1)), dtype=bool, count=n)

    def _against(self, res: np.ndarray, scale: np.ndarray, content: np.ndarray, mem_res: np.ndarray,
                 mem_scale: np.ndarray, mem_content: np.ndarray) -> np.ndarray:
        """Each row's ``matches``-th largest residual similarity to the memory's rows whose content differs
        (re-sent images do not count; -1 when fewer than ``matches`` rows are left), 0 against an empty memory."""
        if len(mem_res) == 0:
            return np.zeros(len(res), dtype=np.float32)
        if _numba.njit is not None:
            return _against_kernel(res, scale, content, mem_res, mem_scale, mem_content, np.float32(self.duplicate),
                                   self.matches)
        return _kth_largest(_similarities(res, scale, content, mem_res, mem_scale, mem_content, self.duplicate),
                            self.matches)

    @property
    def _filled(self) -> int:
        return int(self._ring[0])

    def _memory(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._res[: self._filled], self._scale[: self._filled], self._content[: self._filled]

    def score(self, x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` each input's ``matches``-th largest residual similarity to the remembered queries (memory
        unchanged); 0 for an input whose predicted label (``labels``) is not watched."""
        res, scale, content = self._rows(x)
        watch = self.watched(labels, len(res))
        out = np.zeros(len(res), dtype=np.float32)
        with self._lock:
            out[watch] = self._against(res[watch], scale[watch], content[watch], *self._memory())
        if self.coarse_ is not None:
            out = np.maximum(out, self.coarse_.score(_pool(x, self.coarse), labels))
        return out

    def update(self, x: np.ndarray) -> TriggerMemory:
        """Remember the inputs of ``x`` (the oldest are forgotten past ``size``)."""
        rows = self._rows(x)
        with self._lock:
            self._push(*rows)
        if self.coarse_ is not None:
            self.coarse_.update(_pool(x, self.coarse))
        return self

    def _push(self, res: np.ndarray, scale: np.ndarray, content: np.ndarray) -> None:
        ring = self._ring
        for i in range(max(0, len(res) - self.size), len(res)):
            self._res[ring[1]] = res[i]
            self._scale[ring[1]] = scale[i]
            self._content[ring[1]] = content[i]
            ring[1] = (ring[1] + 1) % self.size
            ring[0] = min(ring[0] + 1, self.size)

    def observe(self, x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Score each input (predicted ``labels``) against the memory and the batch's earlier inputs, then
        remember them all; an input of a label the memory does not watch scores 0."""
        return self.check(x, labels)[0]

    def check(self, x: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`observe`'s similarities (the larger of the two bands') and each watched input's
        :meth:`residual_noise` (0 where not watched)."""
        watch = self.watched(labels, len(x))
        if _numba.njit is not None:  # rows, comparisons, the pooling and the ring buffers in one compiled call
            flat = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
            band = (self.index_, self.neighbours_, *self._shape, watch, self._res, self._scale, self._content,
                    self._ring)
            with self._lock:
                if self.coarse_ is None:
                    return _check_kernel(flat, *band, np.float32(self.duplicate), self.matches, self._floor_scale)
                c = self.coarse_
                return _check_bands_kernel(flat, *band, c.index_, c.neighbours_, self.coarse, c._res, c._scale,
                                           c._content, c._ring, np.float32(self.duplicate), self.matches,
                                           self._floor_scale)
        sim, energy = self._numpy_check(x, watch)
        if self.coarse_ is not None:
            sim = np.maximum(sim, self.coarse_._numpy_check(_pool(x, self.coarse), watch)[0])
        return sim, energy

    def _numpy_check(self, x: np.ndarray, watch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """This band's :meth:`check` without numba: each input scored against the memory, then remembered."""
        res, scale, content, energy, floor = self._rows_energy(x)
        energy = np.maximum(energy, floor * self._floor_scale)
        out = np.zeros(len(res), dtype=np.float32)
        with self._lock:
            for i in range(len(res)):
                one = (res[i:i + 1], scale[i:i + 1], content[i:i + 1])
                if watch[i]:
                    out[i] = self._against(*one, *self._memory())[0]
                self._push(*one)
        energy[~watch] = 0.0
        return out, energy

    def hits(self, similarity: np.ndarray, energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which inputs :meth:`check` found repeating a remembered query's residual, and which had a
        residual stronger than clean images' (its RMS, or its noise floor: :meth:`residual_noise`)."""
        return similarity > self.threshold_, energy > self.energy_threshold_

    SETTINGS = ("size", "n_features", "duplicate", "seed", "labels", "matches", "coarse")

    def to_settings(self) -> dict[str, float | int | list[int] | None]:
        """The calibrated memory as a profile stores it (JSON numbers): its parameters, threshold and FPR."""
        if getattr(self, "threshold_", None) is None:
            raise ValueError("the trigger memory is not calibrated: call infer_threshold first")
        labels = None if self.labels is None else list(self.labels)
        return {k: getattr(self, k) for k in self.SETTINGS} | {
            "labels": labels, "threshold": self.threshold_, "energy_threshold": self.energy_threshold_,
            "floor_threshold": self.floor_threshold_, "fpr": self.fpr_}

    @classmethod
    def from_settings(cls, settings: dict, input_shape: tuple[int, ...]) -> TriggerMemory:
        """A calibrated, empty memory for inputs of ``input_shape`` from :meth:`to_settings`' output (the
        positions are drawn again from the seed; no ``labels`` entry: every label watched)."""
        mem = cls(size=int(settings["size"]), n_features=int(settings["n_features"]),
                  duplicate=float(settings["duplicate"]), seed=int(settings["seed"]), labels=settings.get("labels"),
                  matches=int(settings.get("matches") or 1),  # absent in older profiles: calibrated for one match
                  coarse=settings.get("coarse"))  # absent in older profiles: the pixel band only
        mem.fit(np.zeros((1, *input_shape), dtype=np.float32))
        mem.threshold_, mem.fpr_ = float(settings["threshold"]), float(settings["fpr"])
        energy = settings.get("energy_threshold")  # absent in profiles from before the energy: no such check
        mem.energy_threshold_ = float("inf") if energy is None else float(energy)
        floor = settings.get("floor_threshold")  # absent in profiles from before the noise floor: the RMS alone
        mem.floor_threshold_ = float("inf") if floor is None else float(floor)
        return mem

    @classmethod
    def from_profile(cls, profile) -> TriggerMemory | None:
        """The calibrated, empty memory a profile carries (:meth:`from_settings` of its ``memory`` entry for its
        input shape); None for a profile scanned with ``--memory off``."""
        settings = profile.memory
        return None if settings is None else cls.from_settings(settings, tuple(profile.input_shape))

    def infer_threshold(self, x: np.ndarray, *, fpr: float) -> TriggerMemory:
        """Calibrate on clean ``x``: the similarity's threshold lets half of ``fpr`` of clean queries through,
        the energy's and the noise floor's a quarter each (of the watched queries: the labels share the
        thresholds).

        The similarity's threshold is the larger of two estimates: the replay (each image's score against a
        memory of the ``size`` other clean images before it) and :func:`pair_threshold` on every distinct pair
        of up to :data:`PAIR_IMAGES` of them. With a few hundred images the replay resolves only about a
        1 / n quantile of a score that is a largest-of-256 statistic, and clean images that share part of
        their content pixel for pixel (crops of one photo, a fixed camera's background) make its tail heavy:
        calibrated on 200 glyph images by replay alone, one match at 0.05% rejected 6.6% of held-out clean
        queries (docs/benchmarks.md, 'The trigger memory's calibration'). With the second band each band's
        pairs get half of the similarity's share, and the replay scores the larger of the two bands'. The
        energy's and the floor's thresholds extrapolate their tails where ``x`` cannot resolve the quantile
        (:func:`guard.stats.tail_threshold`); the floor's is at least :data:`MIN_FLOOR_THRESHOLD`. The memory is
        empty afterwards."""
        from guard.stats import tail_threshold, upper_threshold

        need = max(2, self.matches + 1)
        if len(x) < need:
            raise ValueError(f"infer_threshold needs at least {need} clean images")
        bands = [(self, x)] + ([(self.coarse_, _pool(x, self.coarse))] if self.coarse_ is not None else [])
        calibrated = [band._calibration(xb, fpr / 2 / len(bands)) for band, xb in bands]
        replayed = np.max([scores for scores, _, _ in calibrated], axis=0)  # a query's score: the larger band's
        self.threshold_ = max(float(upper_threshold(replayed, fpr / 2)), *(pair for _, pair, _ in calibrated))
        energy, floor = calibrated[0][2]  # the pixel band's; far quantiles, a quarter of the FPR each
        self.energy_threshold_ = tail_threshold(energy, fpr / 4)
        self.floor_threshold_ = max(tail_threshold(floor, fpr / 4), MIN_FLOOR_THRESHOLD)
        self.fpr_ = float(fpr)
        self.reset()
        return self

    def _calibration(self, x: np.ndarray, alpha: float) -> tuple[np.ndarray, float, tuple[np.ndarray, np.ndarray]]:
        """This band's replay scores of clean ``x``, its :func:`pair_threshold` at ``alpha`` and ``x``'s energy and
        noise floor."""
        res, scale, content, energy, floor = self._rows_energy(x)
        n = len(res)
        scores = np.empty(n, dtype=np.float32)
        for i in range(n):  # the memory: the `size` images before i (wrapping round), never i itself
            others = (i + 1 + np.arange(min(self.size, n - 1))) % n
            scores[i] = self._against(res[i:i + 1], scale[i:i + 1], content[i:i + 1], res[others], scale[others],
                                      content[others])[0]
        pick = np.unique(np.linspace(0, n - 1, min(n, PAIR_IMAGES)).astype(np.int64))
        upper = np.triu_indices(len(pick), 1)
        rows = _dequantize(res[pick], scale[pick])
        sim, same = (rows @ rows.T)[upper], (content[pick] @ content[pick].T)[upper] > self.duplicate
        return scores, pair_threshold(sim[~same], size=self.size, matches=self.matches, alpha=alpha), (energy, floor)
