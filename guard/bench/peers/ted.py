"""TED (Mo et al., IEEE S&P 2024) and TED++ (Le et al., ICDM 2025) as the bench's peers.

The algorithm, what is taken from the reference code and where this differs, is
:mod:`guard.online.trajectory`, which the guard's own trajectory check uses too. The peers keep the
papers' settings: TED every clean image given as a reference (up to 1,000), TED++ the same with a
per-reference tube test on each rank. A model either cannot follow raises
:class:`~guard.bench.peers.PeerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from guard.bench.peers._common import PeerUnavailable
from guard.errors import InputError, ModelError
from guard.online.trajectory import Trajectory


class TED(Trajectory):
    """TED detector: ``fit(model, clean_x, clean_y)``, ``score(x)`` (higher = more suspect), with TED's
    references (every clean image the model gets right, up to ``max_fit``) and its distances in float64.

    Parameters
    ----------
    per_class
        References kept per class at most; None (the default here) keeps every one, as TED's notebook.
    layers, spatial, max_dim, n_components, max_fit, batch_size, seed
        As :class:`~guard.online.trajectory.Trajectory`'s.
    """

    name = "TED"
    precision = np.float64  # the reference code's distances

    def __init__(self, *, layers: Sequence[str] | None = None, spatial: int | None = 4, max_dim: int = 1024,
                 n_components: int | str = 2, per_class: int | None = None, max_fit: int = 1000,
                 batch_size: int = 250, seed: int = 0):
        super().__init__(layers=layers, spatial=spatial, max_dim=max_dim, n_components=n_components,
                         per_class=per_class, max_fit=max_fit, batch_size=batch_size, seed=seed)

    def fit(self, model: nn.Module, clean_x: np.ndarray, clean_y: np.ndarray | None = None) -> TED:
        try:
            return super().fit(model, clean_x, clean_y)
        except (InputError, ModelError) as e:  # what the model or the data cannot give: the peer does not run
            raise PeerUnavailable(str(e)) from e


class TEDPlusPlus(TED):
    """TED++ detector: TED with the tube test on each rank; ``alpha`` sets the tube radius (see the module doc).

    Learned beyond TED's: ``radius_`` (per layer, each reference's squared tube radius; infinite for a
    class with one reference).

    Parameters
    ----------
    alpha
        A reference's tube radius is the distance to its ``ceil(alpha * n_c)``-th nearest reference of its
        own class (``n_c`` references in the class); the paper's 0.5.
    layers, spatial, max_dim, n_components, per_class, max_fit, batch_size, seed
        As :class:`TED`'s.
    """

    name = "TED++"

    def __init__(self, *, alpha: float = 0.5, layers: Sequence[str] | None = None, spatial: int | None = 4,
                 max_dim: int = 1024, n_components: int | str = 2, per_class: int | None = None,
                 max_fit: int = 1000, batch_size: int = 250, seed: int = 0):
        super().__init__(layers=layers, spatial=spatial, max_dim=max_dim, n_components=n_components,
                         per_class=per_class, max_fit=max_fit, batch_size=batch_size, seed=seed)
        self.alpha = alpha

    def _predict(self, logits: np.ndarray) -> np.ndarray:
        return self.classes_[logits[:, self.classes_].argmax(1)]

    def _prepare(self) -> None:
        same = self.ref_labels_[:, None] == self.ref_labels_[None, :]
        np.fill_diagonal(same, False)
        n_c = same.sum(1) + 1
        k = np.minimum(np.ceil(self.alpha * n_c).astype(int), n_c - 1)  # the k-th nearest other of its class
        self.radius_ = []
        for j in range(len(self.ref_)):
            d = np.sort(np.where(same, self._reference_distances(j), np.inf), 1)
            r = np.full(len(d), np.inf)
            has = k >= 1
            r[has] = d[has, k[has] - 1]
            self.radius_.append(r)

    def _layer_ranks(self, layer: int, d: np.ndarray, same: np.ndarray) -> np.ndarray:
        masked = np.where(same, d, np.inf)
        nearest = masked.argmin(1)
        dmin = masked[np.arange(len(d)), nearest]
        rank = (d < dmin[:, None]).sum(1)
        outside = dmin > self.radius_[layer][nearest]
        return np.where(outside, len(self.ref_labels_) - 1, rank)
