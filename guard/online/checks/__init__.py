"""Online checks, one per file; each defines its score once (its kernel) and registers itself here."""

from guard.online.checks.base import CHECKS, Check, register
from guard.online.checks.consistency import ConsistencyCheck
from guard.online.checks.feature import FeatureCheck
from guard.online.checks.inner_knn import InnerKNNCheck
from guard.online.checks.knn import KNNCheck
from guard.online.checks.neuron import NeuronCheck
from guard.online.checks.overlap import OverlapCheck
from guard.online.checks.token import TokenCheck
from guard.online.kernels import pool
from guard.online.record import Record

__all__ = ["CHECKS", "Check", "ConsistencyCheck", "FeatureCheck", "InnerKNNCheck", "KNNCheck", "NeuronCheck",
           "OverlapCheck", "Record", "TokenCheck", "pool", "register"]
