"""Suspect-neuron activation: the features each suspect label's reversed trigger raises most."""

from __future__ import annotations

import numpy as np

from guard.online.checks.base import Check, register, standardiser
from guard.online.kernels import kernel, vecmat


@kernel
def neuron_score(p, x, pred, f, g):
    """The largest standardised mean activation over the suspect labels' neuron groups."""
    weights, bias = p
    return (vecmat(f, weights) + bias).max()


@register
class NeuronCheck(Check):
    """Activation outliers on each suspect label's suspect neurons (the features its reversed trigger
    raises most). Score: the largest standardised mean activation over the suspect labels.

    Parameters
    ----------
    neurons
        One array of feature-layer indices per suspect label: the neurons its reversed trigger raises
        most (:func:`guard.scan.neural_cleanse.suspect_neurons`); each group's mean activation is scored.
    dim
        Width ``D`` of the feature layer the indices refer to.

    Attributes
    ----------
    weights_
        ``(D, L)`` float32, column ``l`` averages label ``l``'s neurons and divides by the clean
        standard deviation of that mean (profile key ``weights``).
    bias_
        ``(L,)`` float32, minus the clean mean over that deviation (profile key ``bias``).
    threshold_, fpr_
        The calibrated threshold and the clean rate it lets through (:meth:`infer_threshold`).

    A check restored from a profile has the attributes but not ``neurons`` and ``dim``, which the
    profile does not store.
    """

    name = "neuron"
    kernel = neuron_score
    STATE = ("weights", "bias")

    def __init__(self, neurons: list[np.ndarray], dim: int):
        self.neurons = neurons
        self.dim = dim

    def _fit(self, record, y):
        w = np.zeros((self.dim, len(self.neurons)), dtype=np.float32)
        for k, idx in enumerate(self.neurons):
            w[np.asarray(idx, dtype=np.int64), k] = 1.0 / max(len(idx), 1)
        mu, sd = standardiser(record.features @ w)
        self.weights_ = (w / sd).astype(np.float32)
        self.bias_ = (-mu / sd).astype(np.float32)

    def params(self):
        return (np.ascontiguousarray(self.weights_, dtype=np.float32),
                np.ascontiguousarray(self.bias_, dtype=np.float32))
