"""Offline scans: trigger reverse-engineering and the profile they produce."""

from .blend import BlendReversal
from .neural_cleanse import NeuralCleanse, suspect_neurons
from .profile_builder import build_profile, records
from .pruning import FinePruning, Unlearning
from .tnd import DFTND, DLTND

__all__ = ["BlendReversal", "DFTND", "DLTND", "FinePruning", "NeuralCleanse", "Unlearning", "build_profile",
           "records", "suspect_neurons"]
