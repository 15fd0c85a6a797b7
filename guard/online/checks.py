"""Online checks: each scores a :class:`Record` of one forward pass, higher = more suspect.

A check follows alibi-detect's shape: ``fit`` on clean records learns its statistics,
``infer_threshold(records, fpr=...)`` sets the threshold that lets ``fpr`` of clean inputs through,
``score(record)`` returns one float per input and ``predict(record)`` whether each is over. State
is plain numpy arrays (``state()`` / ``from_state``) so a profile stores it in safetensors.

Scores are computed in numpy on the arrays the forward pass already produced: the whole ensemble is a
few small matrix products, which keeps the guard's own cost a small share of a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.stats import upper_threshold


@dataclass
class Record:
    """What one guarded forward pass saw: inputs ``x`` (N, C, H, W), ``logits`` (N, K),
    feature-layer activations ``features`` (N, D) and, where the profile has an inner layer, its
    pooled activations ``inner`` (N, 2C; :func:`guard.model.pool_inner`), all float32 numpy arrays."""

    x: np.ndarray
    logits: np.ndarray
    features: np.ndarray
    inner: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.logits)

    def take(self, idx) -> Record:
        return Record(self.x[idx], self.logits[idx], self.features[idx],
                      None if self.inner is None else self.inner[idx])


class Check:
    """Base class: subclasses set ``name`` and implement ``_fit``, ``score``, ``state``."""

    name = "check"

    def __init__(self):
        self.threshold_: float | None = None
        self.fpr_: float | None = None

    def fit(self, record: Record, y: np.ndarray | None = None) -> Check:
        self._fit(record, y)
        return self

    def _fit(self, record: Record, y: np.ndarray | None) -> None:
        pass

    def score(self, record: Record) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def infer_threshold(self, record: Record, *, fpr: float) -> Check:
        self.threshold_ = upper_threshold(self.score(record), fpr)
        self.fpr_ = float(fpr)
        return self

    def predict(self, record: Record) -> np.ndarray:
        if self.threshold_ is None:
            raise RuntimeError(f"{self.name}: call infer_threshold first")
        return self.score(record) > self.threshold_

    STATE: tuple[str, ...] = ()
    """The fitted attributes a profile stores, as plain arrays; a check with more to restore overrides
    :meth:`_restore` (derived attributes) or both :meth:`state` and :meth:`from_state`."""

    def state(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.STATE}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Check:
        c = cls.__new__(cls)
        Check.__init__(c)
        for k in cls.STATE:
            setattr(c, k, state[k])
        c._restore()
        return c

    def _restore(self) -> None:
        """Rebuild what :meth:`from_state` does not read from the profile (nothing by default)."""


def _class_whitening(f: np.ndarray, record: Record, y: np.ndarray | None, *,
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


def _standardiser(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = values.mean(0)
    sd = values.std(0)
    return mu.astype(np.float32), np.maximum(sd, 1e-6).astype(np.float32)


class NeuronCheck(Check):
    """Activation outliers on each suspect label's suspect neurons (the features its reversed trigger
    raises most). Score: the largest standardised mean activation over the suspect labels."""

    name = "neuron"
    STATE = ("weights", "bias")

    def __init__(self, neurons: list[np.ndarray], dim: int):
        super().__init__()
        w = np.zeros((dim, len(neurons)), dtype=np.float32)
        for k, idx in enumerate(neurons):
            w[np.asarray(idx, dtype=np.int64), k] = 1.0 / max(len(idx), 1)
        self.weights = w
        self.bias = np.zeros(len(neurons), dtype=np.float32)

    def _fit(self, record, y):
        mu, sd = _standardiser(record.features @ self.weights)
        self.weights = self.weights / sd
        self.bias = -mu / sd

    def score(self, record):
        return (record.features @ self.weights + self.bias).max(1)


class OverlapCheck(Check):
    """How unusually the input matches each suspect label's reversed pattern inside its reversed mask.

    Per label: ``1 - sum(m * |x - p|) / (C * sum(m))``, standardised on clean inputs; the score is
    the largest *absolute* deviation over the suspect labels. Two-sided on purpose: the reversed
    pattern is one trigger that works, not the attacker's, and on the demo model a stamped patch
    inside the mask sits consistently *farther* from the reversed pattern than clean pixels do
    (one-sided AUROC 0.05, two-sided well above 0.5). Catches a trigger where the reversed mask found it.
    """

    name = "overlap"
    STATE = ("m", "p", "mu", "sd")

    SUPPORT = 1e-3
    """Mask weights below this share of the largest are dropped: a reversed mask is a few dozen pixels
    of weight near 1 over a near-zero rest, and scoring only its support keeps the check to a
    gather and a few hundred operations per input instead of the whole image."""

    def __init__(self, masks: np.ndarray, patterns: np.ndarray):
        super().__init__()
        c = patterns.shape[1]
        m = np.broadcast_to(masks, patterns.shape).reshape(len(masks), -1).astype(np.float32)
        self.m = m / (c * np.maximum(masks.reshape(len(masks), -1).sum(1, keepdims=True), 1e-6))
        self.p = patterns.reshape(len(patterns), -1).astype(np.float32)
        self.mu = np.zeros(len(masks), dtype=np.float32)
        self.sd = np.ones(len(masks), dtype=np.float32)
        self._support()

    def _support(self) -> None:
        self._idx = np.flatnonzero(self.m.max(0) > self.SUPPORT * max(float(self.m.max()), 1e-12))
        self._m_s = np.ascontiguousarray(self.m[:, self._idx])
        self._p_s = np.ascontiguousarray(self.p[:, self._idx])

    def _raw(self, record):
        flat = record.x.reshape(len(record.x), -1)[:, self._idx]
        return 1.0 - (np.abs(flat[:, None, :] - self._p_s[None]) * self._m_s[None]).sum(2)

    def _fit(self, record, y):
        self.mu, self.sd = _standardiser(self._raw(record))

    def score(self, record):
        return np.abs((self._raw(record) - self.mu) / self.sd).max(1)

    def _restore(self):
        self._support()


class FeatureCheck(Check):
    """Label-agnostic: Mahalanobis distance of the features to the clean mean of the predicted class,
    with one shrunk covariance shared by all classes (Lee et al., 2018). A backdoored input reaches
    its target label through features clean images of that label do not have, and this check needs
    no scan result, so a model where the scan found nothing still has a calibrated guard."""

    name = "feature"
    STATE = ("whiten", "centres")

    def __init__(self, *, shrinkage: float | None = None):
        super().__init__()
        self.shrinkage = shrinkage

    def _fit(self, record, y):
        whiten, centres = _class_whitening(record.features, record, y, shrinkage=self.shrinkage)
        self.whiten = whiten.astype(np.float32)
        self.centres = centres.astype(np.float32)

    def score(self, record):
        z = record.features @ self.whiten
        pred = record.logits.argmax(1)
        d = z - self.centres[pred]
        return np.einsum("ij,ij->i", d, d)

    def _restore(self):
        self.shrinkage = None


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
    """

    name = "knn"

    def __init__(self, *, k: int = 5, max_bank: int = 2000, seed: int = 0):
        super().__init__()
        self.k = int(k)
        self.max_bank = int(max_bank)
        self.seed = int(seed)

    @staticmethod
    def _unit(f: np.ndarray) -> np.ndarray:
        return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _fit(self, record, y):
        f = record.features
        labels = np.asarray(record.logits.argmax(1) if y is None else y, dtype=np.int64)
        if len(f) > self.max_bank:
            pick = np.sort(np.random.default_rng(self.seed).choice(len(f), self.max_bank, replace=False))
            f, labels = f[pick], labels[pick]
        order = np.argsort(labels, kind="stable")
        self.bank = np.ascontiguousarray(self._unit(f[order]))  # (M, D), rows grouped by class
        n_classes = record.logits.shape[1]
        edges = np.searchsorted(labels[order], np.arange(n_classes + 1))
        self.starts, self.stops = edges[:-1].astype(np.int64), edges[1:].astype(np.int64)
        # a class with fewer than k clean images is compared with the whole bank
        small = (self.stops - self.starts) < max(self.k, 1)
        self.starts[small], self.stops[small] = 0, len(self.bank)
        self.k = int(min(max(self.k, 1), int((self.stops - self.starts).min())))

    def _kth(self, f: np.ndarray, c: int) -> np.ndarray:
        rows = self.bank if self.starts is None else self.bank[self.starts[c]:self.stops[c]]
        sim = f @ rows.T  # cosine similarity times |f|; the query's norm does not change the order
        m = sim.shape[1]
        return np.partition(sim, m - self.k, axis=1)[:, m - self.k]

    def score(self, record):
        f = record.features
        pred = record.logits.argmax(1)
        if len(f) == 1:  # the online hot path
            kth = self._kth(f, int(pred[0]))
        else:
            kth = np.empty(len(f), dtype=np.float32)
            for c in np.unique(pred):
                sel = pred == c
                kth[sel] = self._kth(f[sel], int(c))
        norm = np.sqrt(np.einsum("ij,ij->i", f, f))
        return (1.0 - kth / np.maximum(norm, 1e-12)).astype(np.float32)

    def state(self):
        return {"bank_rows": self.bank, "starts": self.starts, "stops": self.stops,
                "k": np.array([self.k], dtype=np.int64)}

    @classmethod
    def from_state(cls, state):
        c = cls.__new__(cls)
        Check.__init__(c)
        c.k, c.seed = int(state["k"][0]), 0
        if "bank_rows" in state:
            c.bank, c.starts, c.stops = state["bank_rows"], state["starts"], state["stops"]
        else:  # a profile from before the class-conditional bank: one bank for every class
            c.bank = np.ascontiguousarray(state["bank"].T)
            c.starts = c.stops = None
        c.max_bank = len(c.bank)
        return c


class ConsistencyCheck(Check):
    """Label-agnostic, one block earlier: does the last convolutional block agree with the model's label?

    A linear discriminant (class means, one shrunk covariance, as in :class:`FeatureCheck`) on the
    pooled activations of the inner layer (each channel's spatial mean and max) scores every class;
    the check's score is how much further, in squared Mahalanobis distance, the model's label is than
    the discriminant's best class (0 when they agree). A trigger has to carry the input to its target
    by the last layers; a block earlier the input still looks like its true class, most of all for
    triggers that change the whole image mildly (Blended, SIG), which the last layer's distances see
    least (the layer-wise consistency idea of deep k-NN, Papernot and McDaniel, 2018). Because the
    squared norm of the input's own projection cancels, a score is one ``(2C, K)`` product.
    """

    name = "consistency"
    STATE = ("proj", "offset")

    def _fit(self, record, y):
        if record.inner is None:
            raise ValueError("the consistency check needs the inner layer's activations (Record.inner)")
        whiten, centres = _class_whitening(record.inner, record, y)
        # |z - c_k|^2 = |z|^2 - 2 z.c_k + |c_k|^2 with z = f @ whiten: the |z|^2 term is the same for
        # every class, so d_pred - min_k d_k only needs f @ (-2 whiten @ centres.T) + |c_k|^2
        self.proj = (-2.0 * whiten @ centres.T).astype(np.float32)
        self.offset = (centres ** 2).sum(1).astype(np.float32)

    def score(self, record):
        g = record.inner @ self.proj + self.offset
        pred = record.logits.argmax(1)
        return (g[np.arange(len(g)), pred] - g.min(1)).astype(np.float32)


CHECKS: dict[str, type[Check]] = {c.name: c for c in (NeuronCheck, OverlapCheck, FeatureCheck, KNNCheck,
                                                       ConsistencyCheck)}
