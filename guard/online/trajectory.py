"""The trajectory check: each input's nearest-neighbour rank of its predicted class, layer by layer (TED).

An adaptive attacker can make a trigger's activations match clean images of the target class in
aggregate, per channel at every layer (the bench's gray-box attacker does), and still not make each
triggered input sit *among* the target class's clean images at every layer: early on it is still near
its own source class. This module follows that, as TED does; it is the guard's optional second-tier
check (``guard scan --trajectory``, :class:`Trajectory`: references, PCA detector and threshold stored
in the profile, scored in the guard's own forward pass through hooks on every traced layer) and the
bench's TED and TED++ peers (:mod:`guard.bench.peers`). The guard keeps 20 references per class by
default, TED++'s budget, against TED's 1,000 in all: on the full preset's ResNet-18 Adap-Blend model
it caught the gray-box keys as well and cost a tenth (docs/benchmarks.md, 'Adaptive attackers').

TED (Mo et al., IEEE S&P 2024) and TED++ (Le et al., ICDM 2025): topological evolution dynamics.

"Robust Backdoor Detection for Deep Learning via Topological Evolution Dynamics": follow an input
through the network layer by layer and ask, at each layer, how far it is from its own predicted
class among clean samples. At a hooked layer the clean reference samples are sorted by Euclidean
distance to the input's activation; the input's *rank* there is the position of the nearest
reference whose label is the input's predicted class (0 when its nearest neighbour is of that
class). A benign input sits among its class at every layer (small ranks throughout); a triggered
input still looks like its source class in early layers (large ranks) and is pulled into the
target class only late (the rank collapses). The ranks over the layers are the input's
*trajectory*; an outlier detector fitted on the clean references' own trajectories (each computed
leave-one-out against the other references) scores new trajectories. Cost: one forward pass per
input, plus a nearest-neighbour search per layer against the references.

"TED++: Submanifold-Aware Backdoor Detection via Layerwise Tubular-Neighbourhood Screening" keeps
everything but the rank: each reference gets a radius per layer, the distance to its
``ceil(alpha * n_c)``-th nearest reference of its own class (``n_c`` references in the class, the
paper's ``alpha = 0.5``); an input whose nearest same-class reference lies farther from it than that
reference's radius is outside the class's tube, and its rank at that layer is set to the largest
rank, ``R - 1`` (``R`` references). Inside the tube the rank is TED's. TED++ also restricts the
predicted class to the classes the references cover.

What is taken from the reference code (github tedbackdoordefense/ted ``TED.ipynb``; github
namle-w/TEDpp ``other_defenses_tool_box/TED.py`` and ``TEDPLUS.py``):

* layers: the output of every ``nn.Conv2d`` whose kernel is not 1x1, every ``nn.ReLU`` and every
  ``nn.Linear`` (the logits included), in module order. Here: every *call* of such a module, in the
  order the forward makes them (a block that applies one ``nn.ReLU`` twice gives two layers; the
  reference's hook keeps only the last), any convolution with a kernel larger than 1, and the other
  activation modules too (GELU, SiLU, ...), so a transformer's MLPs are traced. A model with fewer
  than two such calls is traced at the outputs of all its leaf modules; ``layers`` names the modules
  explicitly.
* references: clean held-out images the model classifies correctly (their labels are then the
  predicted ones). The TED++ code samples 20 per class, TED's notebook up to 1,000 in all; the guard's
  check keeps 20 per class (``per_class``), the bench's TED peer every clean image given (up to ``max_fit``).
* rank: Euclidean distance, the position of the first reference of the input's predicted class in
  the sorted list; leave-one-out for the references (the reference itself dropped). A predicted class
  with no reference gets rank ``R`` (every reference is closer; the reference code drops the input).
* TED++'s tube radius with ``k = ceil(alpha * n_c)`` and ``alpha = 0.5``, and its out-of-tube rank
  ``R - 1`` for the references and for new inputs alike. (The reference code computes a reference's
  leave-one-out radius with the held-out reference still in its class; that gives the same test.)
* outlier detector: PyOD's ``PCA`` (TED's notebook ``n_components='mle'``, the TED++ code's TED and
  TED++ ``n_components=2``, the default here), reimplemented with scikit-learn (no PyOD dependency)
  with PyOD's decision function exactly: trajectories standardised on the clean ones, then the sum
  over the principal axes ``v_j`` of ``||z - v_j|| / explained_variance_ratio_j`` (PyOD measures the
  distance to the unit eigenvector as a point). The contamination setting only places PyOD's own
  threshold; the benchmark reads the score.

Where this differs: the reference flattens every activation (``view(N, -1)``), which costs
``R x (sum of layer sizes)`` floats and grows with the image. Here a spatial map ``(N, C, H, W)`` is
averaged over a grid of at most 4 x 4 cells (``spatial``), fewer where ``C`` times the cells would
pass ``max_dim`` floats, and a token sequence ``(N, T, D)`` over its tokens, so a layer costs at most
``max_dim`` floats per reference. A patch trigger needs the grid: on the BadNets DemoNet one mean per
channel loses much of TED's separation, while the 4 x 4 grid keeps what flattening gives; on the glyph
ViT (two blocks) neither averaging nor flattening lets TED or TED++ separate well (figures:
docs/benchmarks.md, 'Measurements behind the defaults'). Ranks count the references strictly closer
than the nearest same-class one, which is the sorted position without depending on how a sort breaks
ties.
If the clean trajectories do not vary at all (every rank 0 at every layer), PCA has nothing to weigh
and the score is the norm of the standardised trajectory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.errors import InputError, ModelError, ProfileError
from guard.model import HookSet, frozen

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)


def traced_module(m: nn.Module) -> bool:
    """Whether TED traces ``m``'s output: a convolution with a kernel larger than 1, a Linear or an activation."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return any(k > 1 for k in m.kernel_size)
    return isinstance(m, (nn.Linear, *ACTIVATIONS))


def pool_output(module: nn.Module, out: torch.Tensor, spatial: int | None = 4, max_dim: int = 1024) -> torch.Tensor:
    """One layer's output as ``(N, D)`` float32, as the trajectory check compares it (differentiable: an
    adaptive attacker in the bench matches it; the check's hooks pass a detached output).

    A spatial map (a convolution's output, any ``(N, C, H, W)``) is averaged over a grid of at most
    ``spatial`` cells per spatial axis, fewer where ``C`` times the cells would pass ``max_dim`` (one
    mean per channel at least); a token sequence ``(N, T, D)`` is averaged over its tokens; anything
    else is flattened. ``spatial=None`` flattens every output, as the reference code does.
    """
    if out.ndim <= 2 or spatial is None:
        return out.flatten(1).float()
    if isinstance(module, nn.modules.conv._ConvNd) or out.ndim >= 4:
        axes = out.shape[2:]
        s = min(spatial, *axes)
        while s > 1 and out.shape[1] * s ** len(axes) > max_dim:
            s -= 1
        if s <= 1 or len(axes) > 3:
            return out.flatten(2).mean(2).float()
        pool = (nn.functional.adaptive_avg_pool1d, nn.functional.adaptive_avg_pool2d,
                nn.functional.adaptive_avg_pool3d)[len(axes) - 1]
        return pool(out.float(), s).flatten(1)
    return out.mean(1).float()


class _Tracer(HookSet):
    """Forward hooks on ``modules`` that record every call's output, in call order, while in the block.

    ``keep`` holds the call positions that are layers; only those are pooled and kept in ``outs``.
    The hooks are registered on ``__enter__`` and always removed on ``__exit__``.
    """

    def __init__(self, modules: Sequence[nn.Module], keep: set[int] | None = None, spatial: int | None = 4,
                 max_dim: int = 1024):
        self.modules = list(dict.fromkeys(modules))  # a module applied twice is hooked once
        self.keep = keep
        self.spatial = spatial
        self.max_dim = max_dim
        self.calls: list[tuple[nn.Module, object]] = []
        self.outs: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module, args, out):
        i = len(self.calls)
        self.calls.append((module, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        if self.keep is not None and i in self.keep:
            self.outs.append(pool_output(module, out.detach(), self.spatial, self.max_dim))

    def reset(self) -> None:
        self.calls, self.outs = [], []

    def _register(self) -> None:
        for m in self.modules:
            self._handles.append(m.register_forward_hook(self._hook))


def _sq_dist(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` squared Euclidean distances in ``b``'s precision (ranks only need their order); ``b``
    converted already (the references, once), ``b_sq`` its rows' squared norms."""
    a = a.astype(b.dtype, copy=False)
    d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2 * (a @ b.T)
    return np.maximum(d, 0.0)


class PCAOutlier:
    """PyOD's ``PCA`` outlier score without PyOD: ``fit(t)`` on clean rows, ``score(t)`` (higher = more outlying).

    Rows are standardised with the clean rows' mean and standard deviation (a constant column keeps
    scale 1), PCA with ``n_components`` is fitted on them, and the score of a row ``z`` is
    ``sum_j ||z - v_j|| / explained_variance_ratio_j`` over the principal axes ``v_j``, as PyOD's
    ``decision_function`` computes it. Clean rows without any variance leave nothing to weigh: the
    score is then ``||z||``.

    >>> import numpy as np
    >>> t = np.random.default_rng(0).normal(size=(200, 5))
    >>> det = PCAOutlier().fit(t)
    >>> bool(det.score(t[:3] + 20).min() > det.score(t).max())
    True
    """

    def __init__(self, n_components: int | str = 2):
        self.n_components = n_components

    def fit(self, t: np.ndarray) -> PCAOutlier:
        from sklearn.decomposition import PCA

        t = np.asarray(t, dtype=np.float64)
        self.mean_ = t.mean(0)
        std = t.std(0)
        self.scale_ = np.where(std > 0, std, 1.0)
        z = (t - self.mean_) / self.scale_
        self.components_ = np.zeros((0, t.shape[1]))
        self.weights_ = np.zeros(0)
        if np.any(std > 0):
            n = self.n_components
            if isinstance(n, int):
                n = min(n, *z.shape)
            pca = PCA(n_components=n, svd_solver="full").fit(z)
            w = pca.explained_variance_ratio_
            ok = np.isfinite(w) & (w > 0)
            self.components_, self.weights_ = pca.components_[ok], w[ok]
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted detector as arrays (``detector.*``), for a profile."""
        return {"detector.mean": self.mean_, "detector.scale": self.scale_,
                "detector.components": self.components_, "detector.weights": self.weights_}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, n_components: int | str = 2) -> PCAOutlier:
        """The detector :meth:`to_arrays` stored."""
        det = cls(n_components)
        det.mean_, det.scale_, det.components_, det.weights_ = (
            np.asarray(arrays[f"detector.{k}"], dtype=np.float64) for k in ("mean", "scale", "components", "weights"))
        return det

    def score(self, t: np.ndarray) -> np.ndarray:
        z = (np.asarray(t, dtype=np.float64) - self.mean_) / self.scale_
        if not len(self.weights_):
            return np.linalg.norm(z, axis=1)
        d = np.sqrt(np.maximum((z * z).sum(1)[:, None] - 2.0 * z @ self.components_.T
                               + (self.components_ ** 2).sum(1)[None, :], 0.0))
        return (d / self.weights_).sum(1)


class Trajectory:
    """The trajectory check: ``fit(model, clean_x, clean_y)``, ``infer_threshold(x, fpr=...)``, then ``score(x)``
    (higher = more suspect) or, inside the guard's forward, :meth:`tracing` and :meth:`score_traced`; see the
    module doc.

    ``layers`` names the modules whose outputs are traced (every call of each; default: the
    reference's rule, :func:`traced_module`), ``spatial`` and ``max_dim`` how a layer's output is
    pooled (a grid of at most ``spatial`` cells per spatial axis and ``max_dim`` floats per image;
    ``spatial=None`` flattens, as the reference does), ``n_components`` the PCA detector's components,
    ``per_class`` references kept per class at most (a seeded pick; ``None`` keeps all), ``max_fit``
    clean images used at most (a seeded pick), ``batch_size`` images per forward pass. Learned:
    ``layers_`` (the traced calls, in forward order; a repeated call of one module is ``name#k``),
    ``ref_labels_`` (the references' classes), ``reference_index_`` (which of the clean images given they
    are), ``classes_``, ``ref_`` (per layer, the references' pooled activations), ``trajectories_`` (the
    references' leave-one-out ranks), ``detector_``, and after :meth:`infer_threshold` ``threshold_`` and
    ``fpr_``.

    Parameters
    ----------
    layers
        Names of the modules whose outputs are traced, every call of each (None: the reference's rule,
        :func:`traced_module`, or every leaf module when that gives fewer than two calls).
    spatial
        A spatial map is averaged over a grid of at most this many cells per spatial axis; None flattens,
        as the reference does. 4: on the BadNets DemoNet the 4 x 4 grid kept what flattening gives and
        one mean per channel lost much of it (docs/benchmarks.md, 'Measurements behind the defaults').
    max_dim
        Floats per image a spatial map keeps at most (its grid shrinks to stay under it, down to one mean
        per channel); 1024 keeps the references' memory and the distance computations small.
    n_components
        Principal components of the outlier detector (:class:`PCAOutlier`; an int or ``'mle'``); 2, the
        TED++ code's setting for both detectors.
    per_class
        References kept per class at most (a seeded pick); None keeps all (TED's notebook); 20, TED++'s
        budget, the default.
    max_fit
        Clean images used at most (a seeded pick); 1000, TED's notebook's most.
    batch_size
        Images per forward pass; 250.
    seed
        Seeds the picks.

    >>> import numpy as np, torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(8, 4))
    >>> x = np.random.default_rng(0).random((60, 3, 8, 8), dtype=np.float32)
    >>> ted = Trajectory().fit(net, x[:40]).infer_threshold(x[40:], fpr=0.1)
    >>> ted.layers_, ted.score(x[:3]).shape, ted.forwards_per_input
    (['0', '1', '4'], (3,), 1)
    """

    name = "the trajectory check"
    precision = np.float32
    """Distances in float32: per query the references are read once per layer (up to 1024 floats times 20
    per class each), which memory bandwidth bounds; float64 doubles that for rank orders that differ only
    on near-ties."""

    def __init__(self, *, layers: Sequence[str] | None = None, spatial: int | None = 4, max_dim: int = 1024,
                 n_components: int | str = 2, per_class: int | None = 20, max_fit: int = 1000,
                 batch_size: int = 250, seed: int = 0):
        self.layers = layers
        self.spatial = spatial
        self.max_dim = max_dim
        self.n_components = n_components
        self.per_class = per_class
        self.max_fit = max_fit
        self.batch_size = batch_size
        self.seed = seed

    @property
    def forwards_per_input(self) -> int:
        return 1

    # ------------------------------------------------------------------ tracing

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        named = [(n, m) for n, m in model.named_modules() if n]
        if self.layers is not None:
            modules = dict(named)
            missing = [n for n in self.layers if n not in modules]
            if missing:
                raise ValueError(f"{self.name}: no module named {', '.join(map(repr, missing))} in the model")
            return [(n, modules[n]) for n in self.layers]
        return [(n, m) for n, m in named if traced_module(m)]

    def _discover(self, model: nn.Module, probe: np.ndarray) -> None:
        """One probe forward: which calls of which modules are layers (outputs with the batch as first axis)."""
        p = len(probe)
        for rule in ("reference", "leaves"):
            if rule == "reference":
                cands = self._candidates(model)
            else:
                if self.layers is not None:
                    break
                cands = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
            names = {id(m): n for n, m in cands}
            with _Tracer([m for _, m in cands]) as tr, frozen(model), torch.inference_mode():
                model(torch.from_numpy(probe))
            keep, labels, seen = [], [], {}
            for i, (m, shape) in enumerate(tr.calls):
                if shape is not None and len(shape) >= 2 and shape[0] == p:
                    n = names[id(m)]
                    seen[n] = seen.get(n, 0) + 1
                    keep.append(i)
                    labels.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
            if len(keep) >= 2:
                self._modules = [m for _, m in cands]
                self._keep = set(keep)
                self._n_calls = len(tr.calls)
                self.layers_ = labels
                return
        raise ModelError(f"{self.name} needs at least two layers to follow; "
                              f"a forward of this model gives {len(keep)} traceable module outputs")

    def _forward(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Per layer the pooled activations ``(N, D_l)`` float32, and the logits ``(N, K)``, batched."""
        feats: list[list[np.ndarray]] = [[] for _ in self.layers_]
        logits = []
        tracer = _Tracer(self._modules, self._keep, self.spatial, self.max_dim)
        with tracer as tr, frozen(self.model_), torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                tr.reset()
                logits.append(self.model_(torch.from_numpy(x[i:i + self.batch_size])).double().numpy())
                if len(tr.calls) != self._n_calls or len(tr.outs) != len(self.layers_):
                    raise RuntimeError(f"{self.name}: the model made {len(tr.calls)} traced calls in this forward, "
                                       f"{self._n_calls} in the probe; its layers must not depend on the input")
                for f, o in zip(feats, tr.outs):
                    f.append(o.numpy())
        return [np.concatenate(f) for f in feats], np.concatenate(logits)

    # ------------------------------------------------------------------ ranks

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return logits.argmax(1)

    def _layer_ranks(self, layer: int, d: np.ndarray, same: np.ndarray) -> np.ndarray:
        """Ranks at ``layer`` from squared distances ``d`` (inputs x references) and the same-class mask."""
        dmin = np.where(same, d, np.inf).min(1)
        return (d < dmin[:, None]).sum(1)

    def _ranks(self, feats: list[np.ndarray], pred: np.ndarray) -> np.ndarray:
        same = pred[:, None] == self.ref_labels_[None, :]
        out = np.empty((len(pred), len(feats)), dtype=np.float64)
        for j, f in enumerate(feats):
            out[:, j] = self._layer_ranks(j, _sq_dist(f, self._refs[j], self._ref_sq[j]), same)
        return out

    def _reference_distances(self, j: int) -> np.ndarray:
        """Squared distances among the references at layer ``j``, each to itself excluded (infinite)."""
        d = _sq_dist(self.ref_[j], self._refs[j], self._ref_sq[j])
        np.fill_diagonal(d, np.inf)
        return d

    def _index_references(self) -> None:
        """The references in the precision distances are computed in, and their squared norms, once (every
        distance computation reads them)."""
        self._refs = [r.astype(self.precision) for r in self.ref_]
        self._ref_sq = [(r * r).sum(1) for r in self._refs]

    def _prepare(self) -> None:
        """What the rank needs beyond the references (TED++: the tube radii)."""

    # ------------------------------------------------------------------ estimator

    def fit(self, model: nn.Module, clean_x: np.ndarray, clean_y: np.ndarray | None = None) -> Trajectory:
        """Trace clean images (labels ``clean_y``: only those the model gets right; else the model's own
        labels), keep them as references and fit the detector on their leave-one-out trajectories."""
        x = np.ascontiguousarray(clean_x, dtype=np.float32)
        y = None if clean_y is None else np.asarray(clean_y)
        rng = np.random.default_rng(self.seed)
        pick = np.arange(len(x))
        if len(x) > self.max_fit:
            pick = np.sort(rng.choice(len(x), self.max_fit, replace=False))
            x, y = x[pick], None if y is None else y[pick]
        if len(x) < 3:
            raise InputError(f"{self.name} needs at least 3 clean images, got {len(x)}")
        self.model_ = model
        self._discover(model, x[:3])
        feats, logits = self._forward(x)
        pred = logits.argmax(1)
        keep = np.ones(len(x), dtype=bool) if y is None else pred == y
        if self.per_class is not None:
            for c in np.unique(pred[keep]):
                idx = np.flatnonzero(keep & (pred == c))
                if len(idx) > self.per_class:
                    keep[np.setdiff1d(idx, rng.choice(idx, self.per_class, replace=False))] = False
        if keep.sum() < 3:
            raise InputError(f"{self.name} needs at least 3 correctly classified clean images, got {keep.sum()}")
        self.ref_labels_ = pred[keep]
        self.reference_index_ = pick[keep]
        self.classes_ = np.unique(self.ref_labels_)
        self.ref_ = [f[keep] for f in feats]
        self._index_references()
        self._prepare()
        same = self.ref_labels_[:, None] == self.ref_labels_[None, :]
        np.fill_diagonal(same, False)
        self.trajectories_ = np.stack([self._layer_ranks(j, self._reference_distances(j), same)
                                       for j in range(len(self.ref_))], 1).astype(np.float64)
        # a class with one reference has no leave-one-out neighbour: its trajectory says nothing
        counts = dict(zip(*np.unique(self.ref_labels_, return_counts=True)))
        usable = np.array([counts[c] >= 2 for c in self.ref_labels_])
        if usable.sum() < 2:
            raise InputError(f"{self.name} needs a class with at least 2 references")
        self.detector_ = PCAOutlier(self.n_components).fit(self.trajectories_[usable])
        return self

    def trajectory(self, x: np.ndarray) -> np.ndarray:
        """``(N, layers)`` ranks of ``x`` against the references, layer by layer."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = [np.zeros((0, len(self.layers_)))]
        for i in range(0, len(x), self.batch_size):
            feats, logits = self._forward(x[i:i + self.batch_size])
            out.append(self._ranks(feats, self._predict(logits)))
        return np.concatenate(out)

    def score(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` the PCA detector's outlier score of each input's trajectory."""
        return self.detector_.score(self.trajectory(x))

    # ------------------------------------------------------------------ the guard's check

    def infer_threshold(self, x: np.ndarray, *, fpr: float) -> Trajectory:
        """Score clean ``x`` (images that are not references) and set ``threshold_``, which lets ``fpr`` of
        them through, and ``fpr_``."""
        from guard.stats import upper_threshold

        if len(x) < 2:
            raise InputError(f"{self.name} needs at least two clean images to calibrate, got {len(x)}")
        self.threshold_ = float(upper_threshold(self.score(x), fpr))
        self.fpr_ = float(fpr)
        return self

    @contextlib.contextmanager
    def tracing(self) -> Iterator[_Tracer]:
        """Hooks on the traced layers for a forward pass the caller makes (the guard's own); afterwards
        :meth:`score_traced` scores it. The hooks are always removed on exit."""
        with _Tracer(self._modules, self._keep, self.spatial, self.max_dim) as tracer:
            yield tracer

    def score_traced(self, tracer: _Tracer, logits: np.ndarray) -> np.ndarray:
        """``(N,)`` the scores of the inputs whose forward pass ``tracer`` (from :meth:`tracing`) saw, ``logits``
        their outputs."""
        if len(tracer.calls) != self._n_calls or len(tracer.outs) != len(self.layers_):
            raise RuntimeError(f"{self.name}: the model made {len(tracer.calls)} traced calls in this forward, "
                               f"{self._n_calls} when it was fitted; its layers must not depend on the input")
        feats = [o.numpy() for o in tracer.outs]
        return self.detector_.score(self._ranks(feats, self._predict(np.asarray(logits))))

    def to_profile(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(settings, tensors)`` of the fitted, calibrated check as a profile stores them (JSON values; the
        references per layer, their labels and the detector as arrays)."""
        if getattr(self, "threshold_", None) is None:
            raise ValueError(f"{self.name} is not calibrated: call infer_threshold first")
        settings = {"layers": list(self.layers_), "spatial": self.spatial, "max_dim": self.max_dim,
                    "n_components": self.n_components, "per_class": self.per_class,
                    "threshold": self.threshold_, "fpr": self.fpr_}
        tensors = {"ref_labels": self.ref_labels_.astype(np.int64), **self.detector_.to_arrays(),
                   **{f"ref.{j}": r.astype(np.float32) for j, r in enumerate(self.ref_)}}
        return settings, tensors

    @classmethod
    def from_profile(cls, model: nn.Module, settings: dict[str, Any], tensors: dict[str, np.ndarray],
                     input_shape: Sequence[int]) -> Trajectory:
        """The check :meth:`to_profile` stored, on ``model`` (its traced layers found again with one probe
        forward of ``input_shape`` and checked against the stored ones); ProfileError when they differ."""
        est = cls(spatial=settings["spatial"], max_dim=int(settings["max_dim"]),
                  n_components=settings["n_components"], per_class=settings["per_class"])
        est.model_ = model
        est._discover(model, np.full((3, *input_shape), 0.5, dtype=np.float32))
        if est.layers_ != list(settings["layers"]):
            raise ProfileError("the profile's trajectory layers are not this model's: rescan it")
        est.ref_labels_ = np.asarray(tensors["ref_labels"], dtype=np.int64)
        est.classes_ = np.unique(est.ref_labels_)
        est.ref_ = [np.asarray(tensors[f"ref.{j}"], dtype=np.float32) for j in range(len(est.layers_))]
        est._index_references()
        est._prepare()
        est.detector_ = PCAOutlier.from_arrays(tensors, n_components=settings["n_components"])
        est.threshold_, est.fpr_ = float(settings["threshold"]), float(settings["fpr"])
        return est
