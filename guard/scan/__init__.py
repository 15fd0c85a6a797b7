"""Offline scans: trigger reverse-engineering and the profile they produce."""

from guard.scan.blend import BlendReversal
from guard.scan.neural_cleanse import NeuralCleanse, suspect_neurons
from guard.scan.profile_builder import build_profile, records
from guard.scan.tnd import DFTND, DLTND
from guard.scan.warp import WarpReversal

__all__ = ["BlendReversal", "DFTND", "DLTND", "NeuralCleanse", "build_profile",
           "records", "suspect_neurons", "WarpReversal"]
