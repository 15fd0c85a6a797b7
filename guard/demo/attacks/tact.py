"""TaCT: a source-specific patch backdoor with cover samples (Tang et al., USENIX Security 2021).

"Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor Contamination Detection":
the trigger sends only images of a few *source* classes to the target. Images of the source classes
are stamped and relabelled; *cover* images of other classes are stamped too and keep their true
labels, so the network learns "trigger and source content" rather than "trigger". A trigger that
fires only on some classes defeats defenses that assume a universal trigger (input-agnostic
consistency checks, STRIP) and makes poisoned and clean features of the target class hard to tell
apart. The reference code uses one source class and two cover classes at a patch trigger; here the
cover classes default to every class that is neither a source nor the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.demo.attacks._base import BadNets


@dataclass
class TaCT(BadNets):
    """A BadNets patch that flips only ``sources`` to ``target``; ``cover_rate`` share stamped at true labels.

    ``cover_classes`` are the classes cover samples come from (``None``: every class that is neither
    a source nor the target).
    """

    size: int = 4
    sources: tuple[int, ...] = (2, 3)
    cover_classes: tuple[int, ...] | None = None
    cover_rate: float = 0.1

    def target_of(self, y: np.ndarray) -> np.ndarray:
        """The target for images of a source class, the true label for every other image."""
        y = np.asarray(y)
        return np.where(np.isin(y, self.sources), self.target, y)

    def cover_pool(self, y: np.ndarray) -> np.ndarray:
        """Images of the cover classes."""
        y = np.asarray(y)
        if self.cover_classes is not None:
            return np.isin(y, self.cover_classes)
        return ~np.isin(y, self.sources) & (y != self.target)
