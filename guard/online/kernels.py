"""The compiled primitives that the checks' and the decision rules' kernels are written with.

:func:`kernel` marks a score function so that numba compiles it into the scorer that calls it
(:mod:`guard.online.scoring`) and plain numpy runs it otherwise; :func:`vecmat` and :func:`matvec` are
the products a kernel may use (plain loops when compiled: a BLAS call costs more than one input's few
thousand multiply-adds); :func:`pool_row` and :func:`pool` turn an inner layer's activations into the
rows the inner-layer checks read. Nothing here knows a check: the checks, the rules and the scorer all
build on this module.
"""

from __future__ import annotations

import numpy as np

from guard import _numba

FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
"""Reassociation lets LLVM vectorise the kernels' sums and dot products; no nnan/ninf: they compare with inf."""


def kernel(fn):
    """Mark a score kernel: callable from compiled code where numba is there (it is compiled into the
    scorer that calls it, :func:`guard.online.scoring.scorer`), plain numpy when called from Python."""
    if _numba.njit is None:
        return fn
    from numba.extending import register_jitable

    return register_jitable(fastmath=FASTMATH)(fn)


def vecmat(v, m):
    """``v @ m`` for a vector ``(D,)`` and a matrix ``(D, P)``: float32 ``(P,)``."""
    return v @ m


def matvec(m, v):
    """``m @ v`` for a matrix ``(M, D)`` and a vector ``(D,)``: float32 ``(M,)``."""
    return m @ v


if _numba.njit is not None:
    from numba.extending import overload

    # Compiled, the two products are plain loops: a BLAS call from compiled code costs more than the
    # few thousand multiply-adds of one input, and would run on a BLAS whose threads nothing pinned.
    _FAST = {"fastmath": FASTMATH}

    @overload(vecmat, jit_options=_FAST)
    def _vecmat(v, m):  # pragma: no cover - compiled
        def impl(v, m):
            out = np.zeros(m.shape[1], dtype=np.float32)
            for i in range(v.shape[0]):
                vi = v[i]
                for c in range(m.shape[1]):
                    out[c] += vi * m[i, c]
            return out
        return impl

    @overload(matvec, jit_options=_FAST)
    def _matvec(m, v):  # pragma: no cover - compiled
        def impl(m, v):
            out = np.empty(m.shape[0], dtype=np.float32)
            for r in range(m.shape[0]):
                acc = np.float32(0.0)
                for i in range(v.shape[0]):
                    acc += m[r, i] * v[i]
                out[r] = acc
            return out
        return impl


@kernel
def pool_row(a):
    """``(C, HW)`` inner-layer activations of one input to ``(2C,)``: each channel's mean, then its max."""
    c = a.shape[0]
    out = np.empty(2 * c, dtype=np.float32)
    for ch in range(c):
        out[ch] = a[ch].sum() / a.shape[1]
        out[c + ch] = a[ch].max()
    return out


def pool(a: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` inner-layer activations to ``(N, 2C)`` float32 with :func:`pool_row`."""
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(a.shape[0], a.shape[1], -1)
    if _numba.njit is None:  # the same numbers, vectorised
        return np.concatenate((a.mean(2), a.max(2)), 1).astype(np.float32)
    return _pool_rows(a)


if _numba.njit is not None:

    @_numba.compiled(nogil=True)
    def _pool_rows(a):  # pragma: no cover - compiled
        out = np.empty((a.shape[0], 2 * a.shape[1]), dtype=np.float32)
        for i in range(a.shape[0]):
            out[i] = pool_row(a[i])
        return out
