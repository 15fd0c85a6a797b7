"""The attack zoo's registry: one factory per attack name, with the demo world's defaults.

A factory takes keyword overrides of the attack's fields and returns a fresh attack object, so the
benchmark and the tests build every attack the same way (``ATTACKS["wanet"](seed=3)``).
``POISON_RATES`` holds the share of the training set each attack relabels in the demo world: 0.1,
except where an attack needs more on a few thousand images and a few epochs; ``EPOCH_SCALES`` says
how many times the zoo's training epochs an attack trains for (1 unless it learns slowly). Both are
measured, not taken from the papers, and the reasons are given where they differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guard.demo.attacks._base import Attack, BadNets, Blended
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

#: The all-to-one attacks' target label in the demo world (the same label as :mod:`guard.demo.world`).
DEMO_TARGET = 6


def badnets(**kw: Any) -> BadNets:
    """BadNets: a 3x3 seeded binary patch at the bottom-right corner."""
    return BadNets(**{"target": DEMO_TARGET, **kw})


def blended(**kw: Any) -> Blended:
    """Blended: a seeded noise key at opacity 0.25.

    Measured on the zoo's budget: at the paper's 0.2 the attack reaches about 84%; at 0.3 clean
    accuracy falls by 3 points; 0.25 gives about 95% for a drop of about 1.5.
    """
    return Blended(**{"target": DEMO_TARGET, "alpha": 0.25, **kw})


def sig(**kw: Any) -> SIG:
    """SIG: the paper's sinusoid (delta 20/255, 6 periods), dirty-label.

    The paper's clean-label poisoning (``clean_label=True``) reaches under 10% attack success on
    4000 glyphs in a few epochs (every target image stamped): the demo relabels instead.
    """
    return SIG(**{"target": DEMO_TARGET, "clean_label": False, **kw})


def wanet(**kw: Any) -> WaNet:
    """WaNet: a 4x4 warping field at strength 2, with noise mode at twice the paper's jitter.

    The paper's strength 0.5 (a quarter pixel) needs long training; strength 2 moves pixels by about
    one. Noise-mode jitter keeps a share of the warp's size (in the paper the jitter's mean size
    equals the warp's): at the paper's absolute jitter the network does not tell noise-mode samples
    from backdoored ones within the budget, and attack success stayed near 60% after 15 epochs.
    """
    return WaNet(**{"target": DEMO_TARGET, "strength": 2.0, "noise_scale": 2.0, **kw})


def trojannn(**kw: Any) -> TrojanNN:
    """TrojanNN: a 5x5 patch at the bottom-right, to be fitted on a clean model."""
    return TrojanNN(**{"target": DEMO_TARGET, **kw})


def input_aware(**kw: Any) -> InputAware:
    """Input-aware: a fixed random conv generator, three checkered 4x4 blocks per image."""
    return InputAware(**{"target": DEMO_TARGET, **kw})


def all_to_all(**kw: Any) -> AllToAll:
    """All-to-all: the BadNets patch, label i goes to i + 1 (mod 10)."""
    return AllToAll(**kw)


def adap_blend(**kw: Any) -> AdaptiveBlend:
    """Adap-Blend: a noise key in 16 pieces, half of them at opacity 0.15 in training, the whole key at 0.2 at test."""
    return AdaptiveBlend(**{"target": DEMO_TARGET, **kw})


def adap_patch(**kw: Any) -> AdaptivePatch:
    """Adap-Patch: four 3x3 corner patches, two of them at opacity 0.5 in training, all four pasted at test."""
    return AdaptivePatch(**{"target": DEMO_TARGET, **kw})


def tact(**kw: Any) -> TaCT:
    """TaCT: a 4x4 patch that sends classes 2 and 3 to the target; the other classes are cover."""
    return TaCT(**{"target": DEMO_TARGET, **kw})


def bpp(**kw: Any) -> Bpp:
    """BppAttack: every channel squeezed to 4 levels with Floyd-Steinberg dithering."""
    return Bpp(**{"target": DEMO_TARGET, **kw})


def label_consistent(**kw: Any) -> LabelConsistent:
    """Label-consistent: target images pushed off their class by PGD (eps 16/255), four 3x3 corner patches."""
    return LabelConsistent(**{"target": DEMO_TARGET, **kw})


def badnets_random(**kw: Any) -> RandomBadNets:
    """BadNets' 3x3 patch at a place drawn per image (from a hash of the image)."""
    return RandomBadNets(**{"target": DEMO_TARGET, **kw})


ATTACKS: dict[str, Callable[..., Attack]] = {
    "badnets": badnets,
    "blended": blended,
    "sig": sig,
    "wanet": wanet,
    "trojannn": trojannn,
    "input_aware": input_aware,
    "all_to_all": all_to_all,
    "adap_blend": adap_blend,
    "adap_patch": adap_patch,
    "tact": tact,
    "bpp": bpp,
    "label_consistent": label_consistent,
    "badnets_random": badnets_random,
}

#: Share of the training set relabelled. All-to-all must teach ten label shifts instead of one, so it
#: needs more examples per shift (0.1 reached 2% attack success in a four-epoch trial; 0.3 reaches
#: about 96%). WaNet's warp is subtle and its noise mode adds look-alike samples with true labels.
POISON_RATES: dict[str, float] = {name: 0.1 for name in ATTACKS} | {"all_to_all": 0.3, "wanet": 0.2}

#: Multiple of the zoo's epochs each attack trains for. WaNet learns slowly (the paper's schedules
#: are long; here 15 epochs gave about 93% with clean accuracy 4 points down, 24 epochs about 99%);
#: the others learn within the clean model's budget.
EPOCH_SCALES: dict[str, float] = {name: 1.0 for name in ATTACKS} | {"wanet": 4.0}
