"""Trigger makers for demos, tests and benchmarks.

Each attack is a small seeded object with ``stamp(x)`` (apply the trigger to a batch in [0, 1]),
``target_of(y)`` (the label the attacker wants) and ``poison(x, y, rate=..., seed=...)`` (a poisoned
training set). Attacks never touch models, except :class:`TrojanNN`, whose ``fit`` reads a clean model
to optimise its patch; training lives in :mod:`guard.train`, and :mod:`guard.attacks.zoo` trains the
demo zoo (one model per entry of ``ATTACKS``, plus clean models as the negative class).
"""

from ._base import Attack, BadNets, Blended
from ._registry import ATTACKS, DEMO_TARGET, EPOCH_SCALES, POISON_RATES
from .all_to_all import AllToAll
from .input_aware import InputAware
from .sig import SIG
from .trojannn import TrojanNN
from .wanet import WaNet

__all__ = ["ATTACKS", "DEMO_TARGET", "EPOCH_SCALES", "POISON_RATES", "AllToAll", "Attack", "BadNets",
           "Blended", "InputAware", "SIG", "TrojanNN", "WaNet"]
