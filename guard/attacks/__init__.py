"""Trigger makers for demos, tests and benchmarks.

Each attack is a small seeded object with ``stamp(x)`` (apply the trigger to a batch in [0, 1]),
``target_of(y)`` (the label the attacker wants) and ``poison(x, y, rate=..., seed=...)`` (a poisoned
training set). Attacks never touch models: training lives in :mod:`guard.train`.
"""

from ._base import Attack, BadNets, Blended

__all__ = ["Attack", "BadNets", "Blended"]
