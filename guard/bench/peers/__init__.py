"""Input-level peers the benchmark measures the guard against, each a small seeded estimator.

Every peer follows the same shape: ``fit(model, clean_x, ...)`` on clean held-out images returns
``self``; ``score(x)`` returns one float per input, higher = more suspect; ``forwards_per_input`` says
how many forward passes of the model one input costs. A peer that cannot run on a model (IBD-PSC on
a network without BatchNorm) raises :class:`PeerUnavailable` with the reason, so the benchmark
reports why instead of a figure.

* :class:`~guard.bench.peers.ibd_psc.IBDPSC`: parameter-oriented scaling consistency (Hou et al., ICML 2024);
* :class:`~guard.bench.peers.scale_up.ScaleUp`: scaled prediction consistency (Guo et al., ICLR 2023);
* :class:`~guard.bench.strip.Strip`: STRIP (Gao et al., ACSAC 2019);
* :class:`~guard.bench.peers.ted.TED`: topological evolution dynamics, each input's nearest-neighbour rank
  among clean samples followed layer by layer (Mo et al., IEEE S&P 2024);
* :class:`~guard.bench.peers.ted.TEDPlusPlus`: TED++, TED with a per-reference tube test on each rank
  (Le et al., ICDM 2025).
"""

from guard.bench.peers._common import PeerUnavailable
from guard.bench.peers.ibd_psc import IBDPSC
from guard.bench.peers.scale_up import ScaleUp
from guard.bench.peers.ted import TED, TEDPlusPlus
from guard.bench.strip import Strip

__all__ = ["IBDPSC", "PeerUnavailable", "ScaleUp", "Strip", "TED", "TEDPlusPlus"]
