"""Offline repair of a backdoored model: Fine-Pruning and unlearning with the reversed trigger."""

from guard.repair.pruning import FinePruning, Unlearning

__all__ = ["FinePruning", "Unlearning"]
