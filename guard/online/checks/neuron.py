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
    """

    name = "neuron"
    kernel = neuron_score
    STATE = ("weights", "bias")

    def __init__(self, neurons: list[np.ndarray], dim: int):
        super().__init__()
        w = np.zeros((dim, len(neurons)), dtype=np.float32)
        for k, idx in enumerate(neurons):
            w[np.asarray(idx, dtype=np.int64), k] = 1.0 / max(len(idx), 1)
        self.weights = w
        self.bias = np.zeros(len(neurons), dtype=np.float32)

    def _fit(self, record, y):
        mu, sd = standardiser(record.features @ self.weights)
        self.weights = (self.weights / sd).astype(np.float32)
        self.bias = (-mu / sd).astype(np.float32)

    def params(self):
        return (np.ascontiguousarray(self.weights, dtype=np.float32), np.ascontiguousarray(self.bias, dtype=np.float32))
