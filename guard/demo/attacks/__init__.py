"""Trigger makers for demos, tests and benchmarks.

Each attack is a small seeded object with ``stamp(x)`` (apply the trigger to a batch in [0, 1]),
``target_of(y)`` (the label the attacker wants) and ``poison(x, y, rate=..., seed=...)`` (a poisoned
training set, with cover samples where the attack uses them). Attacks never touch models, except
:class:`TrojanNN`, whose ``fit`` reads a clean model to optimise its patch, and :class:`LabelConsistent`,
whose poisoning perturbs images against a clean model; training lives in :mod:`guard.demo.train`, and
:mod:`guard.demo.attacks.zoo` trains the demo zoo (one model per entry of ``ATTACKS``, plus clean models
as the negative class).
"""

from guard.demo.attacks._base import Attack, BadNets, Blended, patch_corner
from guard.demo.attacks._registry import ATTACKS, DEMO_TARGET, EPOCH_SCALES, POISON_RATES
from guard.demo.attacks.adap_blend import AdaptiveBlend
from guard.demo.attacks.adap_patch import AdaptivePatch
from guard.demo.attacks.all_to_all import AllToAll
from guard.demo.attacks.badnets_random import RandomBadNets
from guard.demo.attacks.bpp import Bpp
from guard.demo.attacks.input_aware import InputAware
from guard.demo.attacks.label_consistent import LabelConsistent
from guard.demo.attacks.sig import SIG
from guard.demo.attacks.tact import TaCT
from guard.demo.attacks.trojannn import TrojanNN
from guard.demo.attacks.wanet import WaNet

__all__ = ["ATTACKS", "DEMO_TARGET", "EPOCH_SCALES", "POISON_RATES", "AdaptiveBlend", "AdaptivePatch", "AllToAll",
           "Attack", "BadNets", "Blended", "Bpp", "InputAware", "LabelConsistent", "RandomBadNets", "SIG", "TaCT",
           "TrojanNN", "WaNet", "patch_corner"]
