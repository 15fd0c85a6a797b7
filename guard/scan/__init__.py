"""Offline scans: trigger reverse-engineering and the profile they produce."""

from .neural_cleanse import NeuralCleanse, suspect_neurons
from .profile_builder import build_profile, records

__all__ = ["NeuralCleanse", "build_profile", "records", "suspect_neurons"]
