"""Offline purification of a backdoored model within a bound on the clean-accuracy drop: one estimator
per method over a shared fine-tuning loop (:mod:`guard.purify.tuning`) and an accuracy-bounded
selection (:mod:`guard.purify.selection`) whose drop :mod:`guard.purify.bound` bounds, on the held-out images
or cross-fitted on every clean image. ``guard purify`` runs :func:`purify`."""

from guard.purify.anp import ANP, ANPPruning
from guard.purify.auto import Auto
from guard.purify.base import MIN_PER_CLASS, Purifier
from guard.purify.bound import drop_upper_bound
from guard.purify.combined import CombinedUnlearning
from guard.purify.evidence import Evidence
from guard.purify.fine_pruning import FinePruning
from guard.purify.norm_tuning import NormTuning
from guard.purify.purify import METHODS, make_purifier, purify
from guard.purify.result import PurifyResult
from guard.purify.rnp import RNP, RNPPruning
from guard.purify.sau import SharedAdversarialUnlearning
from guard.purify.unlearning import NCUnlearning

__all__ = ["ANP", "ANPPruning", "Auto", "CombinedUnlearning", "Evidence", "FinePruning", "METHODS", "MIN_PER_CLASS",
           "NCUnlearning", "NormTuning", "Purifier", "PurifyResult", "RNP", "RNPPruning",
           "SharedAdversarialUnlearning", "drop_upper_bound", "make_purifier", "purify"]
