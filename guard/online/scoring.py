"""Score records: every check's kernel and the decision rule's, for batches and single inputs alike.

:func:`scorer` composes the checks' kernels (:mod:`guard.online.checks`) and the rule's
(:mod:`guard.online.ensemble`) into one function over rows; with numba it is compiled once per process
and set of checks, so a batch-1 call is one compiled call after the forward pass. Without numba (or
with ``GUARD_JIT=0``) the same kernels run as numpy, row by row.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from guard import _numba
from guard.online.kernels import FASTMATH, kernel, pool_row
from guard.online.record import Record


class Scored(Protocol):
    """What the scorer needs of a check: its ``kernel`` and the ``params()`` tuple that kernel reads."""

    kernel: Any

    def params(self) -> tuple: ...

MAX_CHECKS = 8
"""How many checks one compiled scorer holds (a profile uses at most the seven registered ones)."""


@kernel
def _skip(p, x, pred, f, g):
    return 0.0


@kernel
def _no_rule(ep, s, c):
    return 0.0


@kernel
def _pooled_row(g, i):
    return g[i]


@kernel
def _raw_row(g, i):
    return pool_row(g[i].reshape(g.shape[1], -1))


def _source_digest(*fns) -> str:
    """A digest of the code this process runs for ``fns``: every function of the modules defining them, of
    this one and of :mod:`guard.online.kernels`, as compiled in memory (each code object's bytecode, names
    and constants, nested functions included: :func:`_code_bytes`). The compiled scorer is cached on disk
    keyed by its closure; the digest in it makes a kernel's change compile a new one rather than load a
    stale one (numba itself only watches the file of the function it caches). It is taken from the loaded
    code, not the files on disk: a process that imported a module before its file changed (a package
    upgraded under a running server) would otherwise store its old kernels under the new files' key, and
    every later process would load them."""
    h = hashlib.sha256()
    for name in sorted({fn.__module__ for fn in fns} | {__name__, "guard.online.kernels"}):
        h.update(name.encode())
        for attr, obj in sorted(vars(sys.modules[name]).items()):
            fn = getattr(obj, "py_func", obj)  # a numba dispatcher or register_jitable wrapper: its Python function
            if isinstance(fn, types.FunctionType) and fn.__module__ == name:
                h.update(attr.encode())
                h.update(_code_bytes(fn.__code__))
    return h.hexdigest()


def _code_bytes(code: types.CodeType) -> bytes:
    """A code object's bytecode, names and constants (nested code objects recursively), the same in every
    process that loaded the same code (``marshal`` is not: it depends on reference counts)."""
    parts = [code.co_code, repr((code.co_names, code.co_varnames, code.co_freevars)).encode()]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            parts.append(_code_bytes(c))
        elif isinstance(c, frozenset):  # its order follows the string hash seed
            parts.append(repr(sorted(map(repr, c))).encode())
        else:
            parts.append(repr(c).encode())
    return b"\0".join(parts)


@functools.lru_cache(maxsize=64)
def scorer(kernels: tuple, rule=None, raw_inner: bool = False):
    """``run(params, rule_params, x, logits, f, g, out)`` over ``N`` rows.

    ``kernels`` are the checks' kernels in column order (``params`` their :meth:`Check.params`, padded
    to :data:`MAX_CHECKS` with ``()``), ``rule`` a decision rule's kernel (``None``: statistic 0).
    ``x`` is ``(N, C, H, W)``, ``logits`` ``(N, K)``, ``f`` ``(N, D)``, ``g`` the inner layer's pooled
    ``(N, 2C)`` activations or, with ``raw_inner``, its raw ``(N, C, H, W)`` ones (pooled here with
    :func:`~guard.online.kernels.pool_row`); all C-contiguous float32. Fills ``out``
    ``(N, 2 * MAX_CHECKS + 1)``: the scores in its first columns, the rule's contributions from
    column ``MAX_CHECKS``, the statistic in the last (:func:`split` takes them apart). One output
    buffer, passed in: each array a compiled call returns costs more than allocating it here.
    """
    n = len(kernels)
    if n > MAX_CHECKS:
        raise ValueError(f"at most {MAX_CHECKS} checks per scorer, got {n}")
    if _numba.njit is None:
        return functools.partial(_numpy_run, kernels, rule, raw_inner)
    k0, k1, k2, k3, k4, k5, k6, k7 = tuple(kernels) + (_skip,) * (MAX_CHECKS - n)
    rule_k = _no_rule if rule is None else rule
    inner_row = _raw_row if raw_inner else _pooled_row
    digest = _source_digest(*kernels, rule_k)

    def run(params, rule_params, x, logits, f, g, out):  # pragma: no cover - compiled
        assert digest  # in the closure, so in the on-disk cache's key
        for i in range(x.shape[0]):
            pred = np.argmax(logits[i])
            xi, fi, gi, s = x[i].reshape(-1), f[i], inner_row(g, i), out[i]
            s[0] = k0(params[0], xi, pred, fi, gi)
            s[1] = k1(params[1], xi, pred, fi, gi)
            s[2] = k2(params[2], xi, pred, fi, gi)
            s[3] = k3(params[3], xi, pred, fi, gi)
            s[4] = k4(params[4], xi, pred, fi, gi)
            s[5] = k5(params[5], xi, pred, fi, gi)
            s[6] = k6(params[6], xi, pred, fi, gi)
            s[7] = k7(params[7], xi, pred, fi, gi)
            s[2 * MAX_CHECKS] = rule_k(rule_params, s[:n], s[MAX_CHECKS:MAX_CHECKS + n])

    return _numba.compiled(nogil=True, fastmath=FASTMATH)(run)


@functools.lru_cache(maxsize=16)
def rule_rows(rule):
    """``run(rule_params, scores, contrib, stat)``: a decision rule's kernel over ``N`` rows of scores."""
    if _numba.njit is None:
        return functools.partial(_numpy_rule_rows, rule)
    digest = _source_digest(rule)

    def run(rule_params, scores, contrib, stat):  # pragma: no cover - compiled
        assert digest
        for i in range(scores.shape[0]):
            stat[i] = rule(rule_params, scores[i], contrib[i])

    return _numba.compiled(nogil=True)(run)


def _numpy_rule_rows(rule, rule_params, scores, contrib, stat):
    for i in range(scores.shape[0]):
        stat[i] = rule(rule_params, scores[i], contrib[i])


def _numpy_run(kernels, rule, raw_inner, params, rule_params, x, logits, f, g, out):
    n = len(kernels)
    for i in range(x.shape[0]):
        pred = int(np.argmax(logits[i]))
        gi = (_raw_row if raw_inner else _pooled_row)(g, i)
        for j, k in enumerate(kernels):
            out[i, j] = k(params[j], x[i].reshape(-1), pred, f[i], gi)
        out[i, -1] = 0.0 if rule is None else rule(rule_params, out[i, :n], out[i, MAX_CHECKS:MAX_CHECKS + n])


def output(n_rows: int) -> np.ndarray:
    """A zeroed output buffer for :func:`scorer`."""
    return np.zeros((n_rows, 2 * MAX_CHECKS + 1), dtype=np.float32)


def split(out: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, contributions, statistic)`` of :func:`scorer`'s output for ``n`` checks."""
    return out[:, :n], out[:, MAX_CHECKS:MAX_CHECKS + n], out[:, 2 * MAX_CHECKS]


def pack(checks: Sequence[Scored]) -> tuple[tuple, tuple]:
    """The checks' kernels and their params padded to :data:`MAX_CHECKS`: ``(kernels, params)``."""
    params = tuple(c.params() for c in checks) + ((),) * (MAX_CHECKS - len(checks))
    return tuple(type(c).kernel for c in checks), params


def run_rows(kernels: tuple, params: tuple, rule, rule_params: tuple, x: np.ndarray, logits: np.ndarray,
             features: np.ndarray, inner: np.ndarray | None, *, raw_inner: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores (N, n_checks), contributions (N, n_checks), statistic (N,))`` of a batch."""
    n = len(x)
    if inner is None:
        inner = np.zeros((n, 1, 1, 1) if raw_inner else (n, 1), dtype=np.float32)
    out = output(n)
    scorer(kernels, rule, raw_inner)(params, rule_params, np.ascontiguousarray(x, dtype=np.float32),
                                     np.ascontiguousarray(logits, dtype=np.float32),
                                     np.ascontiguousarray(features, dtype=np.float32),
                                     np.ascontiguousarray(inner, dtype=np.float32), out)
    return split(out, len(kernels))


def score_checks(checks: Sequence[Scored], record: Record) -> np.ndarray:
    """``(N, n_checks)`` float32 scores of ``record`` by ``checks`` (columns in their order)."""
    kernels, params = pack(checks)
    return run_rows(kernels, params, None, (), record.x, record.logits, record.features, record.inner)[0]
