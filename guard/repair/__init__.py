"""Offline repair of a backdoored model within a bound on the clean-accuracy drop: re-reversed
trigger unlearning (the default), adversarial neuron pruning, Fine-Pruning, Neural Cleanse unlearning."""

from guard.repair.anp import ANP
from guard.repair.pruning import FinePruning, Unlearning
from guard.repair.run import METHODS, MIN_PER_CLASS, RepairResult, repair

__all__ = ["ANP", "METHODS", "MIN_PER_CLASS", "FinePruning", "RepairResult", "Unlearning", "repair"]
