"""What every online check shares: the :class:`Record` it scores, the :class:`Check` base, the registry.

A check follows alibi-detect's shape: ``fit`` on clean records learns its statistics,
``infer_threshold(records, fpr=...)`` sets the threshold that lets ``fpr`` of clean inputs through,
``score(record)`` returns one float per input and ``predict(record)`` whether each is over. It saves
and restores itself, threshold included (:meth:`Check.to_profile`, :meth:`Check.from_profile`), as a
JSON-ready settings dict and plain numpy arrays, so a profile stores it without pickle.

A check's score is defined once, as its ``kernel``: a function of one input,
``kernel(params, x, pred, f, g) -> float`` over the check's prepared arrays ``params`` (a small tuple,
:meth:`Check.params`), the flattened input ``x``, the predicted label ``pred``, the feature row ``f``
and the pooled inner-layer row ``g``. It is written in numpy's array style, so the same function runs
compiled by numba (:func:`guard.online.kernels.kernel`) or, without numba, as plain numpy. Batches and
single inputs both go through it (:mod:`guard.online.scoring`); nothing else computes a check's score.

Adding a check: one file in this package defining the subclass and its kernel, and its name in
``guard/online/checks/__init__.py``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np

from guard.online.record import Record
from guard.online.scoring import score_checks
from guard.stats import upper_threshold


class Check:
    """Base class: subclasses set ``name`` and ``kernel`` and implement ``_fit`` and ``params``.

    A check keeps scikit-learn's estimator conventions: the constructor only stores its parameters,
    unchanged; everything learned is set by :meth:`fit` (or :meth:`infer_threshold`) and ends in
    ``_``, so it does not exist before (a check restored by :meth:`from_profile` has it). ``STATE``
    names the fitted arrays a profile stores, ``SETTINGS`` the scalar ones (JSON), by their profile
    keys: the attribute of key ``k`` is ``k_`` (``check.feature.whiten`` is ``whiten_``). A check with
    derived attributes rebuilds them in :meth:`_restore`.

    Parameters
    ----------
    The base takes none; a subclass's constructor takes its own settings and lists them in its class
    docstring. What every check learns is ``threshold_`` and ``fpr_`` (:meth:`infer_threshold`).
    """

    name: ClassVar[str] = "check"
    kernel: ClassVar[Any] = None
    STATE: ClassVar[tuple[str, ...]] = ()
    SETTINGS: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ learning
    def fit(self, record: Record, y: np.ndarray | None = None) -> Check:
        self._fit(record, y)
        self._restore()
        return self

    def _fit(self, record: Record, y: np.ndarray | None) -> None:
        pass

    def infer_threshold(self, record: Record, *, fpr: float) -> Check:
        return self.calibrate(self.score(record), fpr=fpr)

    def calibrate(self, scores: np.ndarray, *, fpr: float) -> Check:
        """Set the threshold from clean ``scores`` already computed (e.g. cross-fitted ones)."""
        self.threshold_ = upper_threshold(scores, fpr)
        self.fpr_ = float(fpr)
        return self

    # ------------------------------------------------------------------ scoring
    def params(self) -> tuple:
        """The prepared arrays :attr:`kernel` reads, as one small tuple."""
        raise NotImplementedError  # pragma: no cover - interface

    def score(self, record: Record) -> np.ndarray:
        """``(N,)`` float32 scores, higher = more suspect (this check's :attr:`kernel` on every input)."""
        return score_checks([self], record)[:, 0]

    def predict(self, record: Record) -> np.ndarray:
        if getattr(self, "threshold_", None) is None:
            raise RuntimeError(f"{self.name}: call infer_threshold first")
        return self.score(record) > self.threshold_

    # ------------------------------------------------------------------ persistence
    def to_profile(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(settings, tensors)``: the threshold and scalar settings (JSON), the fitted arrays, by their
        profile keys (``STATE``, ``SETTINGS``; attribute ``k_`` for key ``k``)."""
        if getattr(self, "threshold_", None) is None:
            raise RuntimeError(f"{self.name}: call infer_threshold before saving")
        settings = {"threshold": float(self.threshold_)}
        settings.update({k: getattr(self, k + "_") for k in self.SETTINGS})
        return settings, {k: np.asarray(getattr(self, k + "_")) for k in self.STATE}

    @classmethod
    def from_profile(cls, settings: dict[str, Any], tensors: dict[str, np.ndarray], *, fpr: float) -> Check:
        """Rebuild a fitted, calibrated check from :meth:`to_profile`'s output (``fpr``: the profile's)."""
        c = cls.__new__(cls)  # a profile stores what the check learned, not always what it was built with
        for k, v in cls._profile_parameters(settings, tensors).items():
            setattr(c, k, v)
        for k in cls.SETTINGS:
            setattr(c, k + "_", settings[k])
        for k in cls.STATE:
            setattr(c, k + "_", tensors[k])
        c.threshold_, c.fpr_ = float(settings["threshold"]), float(fpr)
        c._restore()
        return c

    @classmethod
    def _profile_parameters(cls, settings: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """The constructor parameters a check restored from a profile reports: by default those the
        constructor has a default for, at that default (a profile does not record them); a subclass whose
        profile records one overrides this."""
        sig = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in sig
                if p.name != "self" and p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def _restore(self) -> None:
        """Rebuild what the profile does not store (derived arrays); called after fit and load."""


CHECKS: dict[str, type[Check]] = {}
"""Every check by name: how a profile's entries find their class."""


def register(cls: type[Check]) -> type[Check]:
    """Class decorator: make ``cls`` loadable from profiles by its ``name``."""
    if cls.name in CHECKS:
        raise ValueError(f"a check named {cls.name!r} is registered already")
    CHECKS[cls.name] = cls
    return cls


def class_whitening(f: np.ndarray, record: Record, y: np.ndarray | None, *,
                    shrinkage: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whitening matrix ``(D, D)`` and whitened class centres ``(K, D)`` of activations ``f``.

    Class means (the labels ``y``, else the model's predictions; a class with no image gets the overall
    mean) and one covariance of the centred activations shared by all classes, shrunk (Ledoit-Wolf, or
    ``shrinkage`` if given), so that squared Euclidean distance after whitening is the Mahalanobis one.
    """
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    f = f.astype(np.float64)
    labels = record.logits.argmax(1) if y is None else y
    k = record.logits.shape[1]
    means = np.stack([f[labels == c].mean(0) if (labels == c).any() else f.mean(0) for c in range(k)])
    est = LedoitWolf() if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage)
    evals, evecs = np.linalg.eigh(est.fit(f - means[labels]).covariance_)
    whiten = evecs / np.sqrt(np.maximum(evals, 1e-8 * evals.max()))
    return whiten, means @ whiten


def standardiser(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and standard deviation (floored at 1e-6), float32."""
    mu = values.mean(0)
    sd = values.std(0)
    return mu.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)
