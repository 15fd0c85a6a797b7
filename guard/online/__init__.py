"""Online path: checks on every query, repair, policy, and the Guard that ties them together."""

from .checks import Check, FeatureCheck, NeuronCheck, OverlapCheck, Record
from .guard import Guard, GuardResult
from .policy import MODES, Decision

__all__ = ["MODES", "Check", "Decision", "FeatureCheck", "Guard", "GuardResult", "NeuronCheck",
           "OverlapCheck", "Record"]
