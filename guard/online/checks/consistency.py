"""Inner-layer consistency: does the last convolutional block agree with the model's label?"""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, class_whitening, register
from guard.online.kernels import kernel, vecmat


@kernel
def consistency_score(p, x, pred, f, g):
    """How much further the model's label is than the discriminant's best class (squared Mahalanobis)."""
    proj, offset = p
    d = vecmat(g, proj) + offset
    return d[pred] - d.min()


@register
class ConsistencyCheck(Check):
    """Label-agnostic, one block earlier: does the last convolutional block agree with the model's label?

    A linear discriminant (class means, one shrunk covariance, as in the feature check) on the
    pooled activations of the inner layer (each channel's spatial mean and max) scores every class;
    the check's score is how much further, in squared Mahalanobis distance, the model's label is than
    the discriminant's best class (0 when they agree). A trigger has to carry the input to its target
    by the last layers; a block earlier the input still looks like its true class, most of all for
    triggers that change the whole image mildly (Blended, SIG), which the last layer's distances see
    least (the layer-wise consistency idea of deep k-NN, Papernot and McDaniel, 2018). Because the
    squared norm of the input's own projection cancels, a score is one ``(2C, K)`` product.

    Parameters
    ----------
    The constructor takes none: the covariance is shrunk with Ledoit-Wolf's estimate (the feature
    check's default), and everything else is learned by ``fit`` from the clean records.

    Attributes
    ----------
    proj_
        ``(2C, K)`` float32, ``-2 whiten @ centres.T`` of the inner layer's discriminant (profile key ``proj``).
    offset_
        ``(K,)`` float32, each whitened class centre's squared norm (profile key ``offset``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).
    """

    name = "consistency"
    kernel = consistency_score
    STATE = ("proj", "offset")

    def _fit(self, record, y):
        if record.inner is None:
            raise ValueError("the consistency check needs the inner layer's activations (Record.inner)")
        whiten, centres = class_whitening(record.inner, record, y)
        # |z - c_k|^2 = |z|^2 - 2 z.c_k + |c_k|^2 with z = g @ whiten: the |z|^2 term is the same for
        # every class, so d_pred - min_k d_k only needs g @ (-2 whiten @ centres.T) + |c_k|^2
        self.proj_ = (-2.0 * whiten @ centres.T).astype(np.float32)
        self.offset_ = (centres ** 2).sum(1).astype(np.float32)

    def params(self):
        return (np.ascontiguousarray(self.proj_, dtype=np.float32),
                np.ascontiguousarray(self.offset_, dtype=np.float32))
