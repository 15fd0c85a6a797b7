"""Online path: checks on every query, repair, policy, and the Guard that ties them together."""

from guard.online.checks import Check, FeatureCheck, NeuronCheck, OverlapCheck, Record
from guard.online.engine import Guard, GuardResult
from guard.online.policy import MODES, Decision

__all__ = ["MODES", "Check", "Decision", "FeatureCheck", "Guard", "GuardResult", "NeuronCheck",
           "OverlapCheck", "Record"]
