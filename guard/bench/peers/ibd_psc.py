"""IBD-PSC (Hou et al., ICML 2024): parameter-oriented scaling consistency, an input-level peer.

"IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency": amplifying the
affine parameters (weight and bias) of a model's last BatchNorm layers wrecks its clean accuracy,
but a poisoned input keeps its target label through the amplified models, because the backdoor's
features are far stronger than the benign ones. The score of an input is the mean probability that
``n`` amplified copies of the model give to the label the original model predicts (higher = more
suspect); cost ``1 + n`` forwards per input.

Layer selection follows the reference code: counting BatchNorm layers from the last, the smallest
count ``k`` whose amplification (by ``scale``) makes the model wrong on more than ``xi`` of clean
held-out images is the collapse point; the ``n`` copies amplify the last ``k + 1``, ..., ``k + n``
layers. A shallow network runs out of layers: past all of them, each further copy amplifies every
layer once more (factor ``scale ** 2``, ``scale ** 3``, ...), so the ``n`` copies stay distinct and
keep amplifying further (the reference code silently repeats the all-layer copy there). The same
ladder extends the search for the collapse point, up to ``max_extra`` rungs past all layers.

The model is never modified: each copy is a deep copy whose parameters are scaled. A model without
BatchNorm layers has nothing to amplify; :meth:`IBDPSC.fit` raises
:class:`~guard.bench.peers.PeerUnavailable` for it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from guard.bench.peers._common import PeerUnavailable, probabilities


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the model's affine BatchNorm layers, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


class IBDPSC:
    """IBD-PSC detector: ``fit(model, clean_x, clean_y)``, ``score(x)`` (higher = more suspect).

    ``n`` amplified copies, ``scale`` the amplification factor (the paper's 1.5), ``xi`` the clean
    error over which amplification has collapsed the model (the reference code's 0.6), ``max_extra``
    how many rungs past all layers the collapse search may go, ``max_fit`` clean images the search
    uses at most (a seeded pick), ``batch_size`` images per forward pass. Learned: ``layers_`` (the
    BatchNorm layers' names, last first), ``start_`` (the collapse rung ``k``), ``rungs_`` (per copy:
    how many last layers it amplifies and by which factor), ``clean_error_`` (per searched rung),
    ``copies_`` (the amplified models).

    >>> import numpy as np, torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    >>> try:
    ...     IBDPSC().fit(net, np.zeros((8, 3, 4, 4), np.float32))
    ... except PeerUnavailable as e:
    ...     print(e)
    IBD-PSC needs BatchNorm layers to amplify; this model has none
    """

    def __init__(self, *, n: int = 5, scale: float = 1.5, xi: float = 0.6, max_extra: int = 8,
                 max_fit: int = 1000, batch_size: int = 500, seed: int = 0):
        self.n = n
        self.scale = scale
        self.xi = xi
        self.max_extra = max_extra
        self.max_fit = max_fit
        self.batch_size = batch_size
        self.seed = seed

    @property
    def forwards_per_input(self) -> int:
        return 1 + self.n

    def _rung(self, r: int, n_layers: int) -> tuple[int, float]:
        """Rung ``r`` (1-based) of the ladder: amplify the last ``min(r, L)`` layers by ``scale ** e``."""
        return min(r, n_layers), float(self.scale ** max(1, r - n_layers + 1))

    def _amplified(self, n_last: int, factor: float) -> nn.Module:
        """A deep copy of the model with the last ``n_last`` BatchNorm layers' weight and bias times ``factor``."""
        m = copy.deepcopy(self.model_)
        modules = dict(m.named_modules())
        with torch.no_grad():
            for name in self.layers_[:n_last]:
                modules[name].weight.mul_(factor)
                modules[name].bias.mul_(factor)
        return m.eval()

    def fit(self, model: nn.Module, clean_x: np.ndarray, clean_y: np.ndarray | None = None) -> IBDPSC:
        """Find the collapse point on clean images (labels ``clean_y``, else the model's own) and build the copies."""
        bns = batchnorm_layers(model)
        if not bns:
            raise PeerUnavailable("IBD-PSC needs BatchNorm layers to amplify; this model has none")
        self.model_ = model
        self.layers_ = [name for name, _ in reversed(bns)]
        x = np.ascontiguousarray(clean_x, dtype=np.float32)
        y = None if clean_y is None else np.asarray(clean_y)
        if len(x) > self.max_fit:
            pick = np.sort(np.random.default_rng(self.seed).choice(len(x), self.max_fit, replace=False))
            x, y = x[pick], None if y is None else y[pick]
        if y is None:
            y = probabilities(model, x, batch_size=self.batch_size).argmax(1)
        n_layers = len(self.layers_)
        self.clean_error_: list[float] = []
        self.start_ = None
        for r in range(1, n_layers + self.max_extra + 1):
            err = float((probabilities(self._amplified(*self._rung(r, n_layers)), x,
                                       batch_size=self.batch_size).argmax(1) != y).mean())
            self.clean_error_.append(round(err, 4))
            if err > self.xi:
                self.start_ = r
                break
        if self.start_ is None:
            raise PeerUnavailable(f"amplifying the BatchNorm layers never pushed the clean error over {self.xi} "
                                  f"(largest {max(self.clean_error_):.2f} after {len(self.clean_error_)} rungs)")
        self.rungs_ = [self._rung(self.start_ + j, n_layers) for j in range(1, self.n + 1)]
        self.copies_ = [self._amplified(k, f) for k, f in self.rungs_]
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """``(N,)`` mean probability the amplified copies give to the original model's label."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        pred = probabilities(self.model_, x, batch_size=self.batch_size).argmax(1)
        rows = np.arange(len(x))
        total = np.zeros(len(x), dtype=np.float64)
        for m in self.copies_:
            total += probabilities(m, x, batch_size=self.batch_size)[rows, pred]
        return total / len(self.copies_)

