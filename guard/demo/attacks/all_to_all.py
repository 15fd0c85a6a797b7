"""All-to-all BadNets: the same patch sends label ``i`` to ``(i + shift) % K`` (Gu et al., 2017).

BadNets' paper introduces this variant next to the all-to-one attack (its MNIST experiment uses
``i -> i + 1``). It matters to a defender because there is no single target label: a scan that looks
for one label much cheaper to reach than the others has nothing to single out, and the network must
combine trigger and content to pick the output, which is why its attack success is lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import BadNets


@dataclass
class AllToAll(BadNets):
    """A BadNets patch with the label map ``y -> (y + shift) % num_classes``.

    ``target`` is not used (every label is a target); it stays -1 so that code expecting one target
    label cannot mistake this attack for an all-to-one attack on label 0.
    """

    target: int = -1
    num_classes: int = 10
    shift: int = 1

    def target_of(self, y: np.ndarray) -> np.ndarray:
        """Attacker's label for inputs of true label ``y``: ``(y + shift) % num_classes``."""
        return (np.asarray(y) + self.shift) % self.num_classes
