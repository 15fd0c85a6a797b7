"""Train the attack zoo on the glyph demo world: one backdoored model per attack, and clean ones.

Used by the tests (quality floors per attack) and the benchmark (detection rates per attack, clean
models as the negative class). Everything is seeded by ``seed``: the data (the same seeds as
:mod:`guard.demo.world`), the attack's own randomness, the poisoned subset and training. Training
uses ``patch_augment=0.5`` as the demo world does, so a change of label takes a large perturbation
unless the model has a backdoor. The network is one of :data:`NETS` (``net=``, DemoNet by default),
each with its own learning rate and epoch multiple (:data:`NET_LR`, :data:`NET_EPOCH_SCALES`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.demo.attacks._base import Attack
from guard.demo.attacks._registry import ATTACKS, EPOCH_SCALES, POISON_RATES
from guard.demo.attacks.label_consistent import LabelConsistent
from guard.demo.attacks.trojannn import TrojanNN
from guard.demo.glyphs import glyphs
from guard.demo.train import attack_success, train
from guard.model import accuracy

#: Every kind of model the zoo trains: the clean negative class, then each attack.
KINDS: tuple[str, ...] = ("clean", *ATTACKS)

#: TrojanNN retrains the clean model for this share of the epochs (the paper fine-tunes, not retrains).
TROJANNN_FINETUNE_SHARE = 0.5

#: Adam's peak learning rate (one-cycle schedule) for every zoo model: twice :func:`guard.demo.train.train`'s
#: default, which lets six epochs on 3000 images reach the quality floors.
LR = 4e-3


@dataclass(frozen=True)
class ZooData:
    """The zoo's training and held-out test sets (glyphs; seeds as in the demo world)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def zoo_data(*, seed: int = 0, n_train: int = 3000, n_test: int = 1000) -> ZooData:
    """Seeded glyph training and test sets (``seed * 10 + 1`` and ``seed * 10 + 3``, as demo_world)."""
    x, y = glyphs(n_train, seed=seed * 10 + 1)
    xt, yt = glyphs(n_test, seed=seed * 10 + 3)
    return ZooData(x, y, xt, yt)


#: Width of the zoo's ResNet-18 (the CIFAR layout of :mod:`guard.demo.nets.resnet` at a reduced width,
#: so that it trains on a CPU): at width 8 it has about as many weights as DemoNet (176k and 156k) and
#: an epoch takes far less time than at the module's width 16 (figures: docs/benchmarks.md,
#: 'Measurements behind the defaults').
RESNET_WIDTH = 8


def _demo_net() -> nn.Module:
    from guard.demo.nets.demo_net import DemoNet

    return DemoNet()


def _resnet18() -> nn.Module:
    from guard.demo.nets.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [2, 2, 2, 2], width=RESNET_WIDTH)


#: The zoo's networks by name: each name is a module of :mod:`guard.demo.nets` (its code goes into the
#: benchmark cache's key).
NETS: dict[str, Callable[[], nn.Module]] = {"demo_net": _demo_net, "resnet18": _resnet18}
#: Adam's peak learning rate per network.
NET_LR: dict[str, float] = {"demo_net": LR, "resnet18": LR}
#: Multiple of the zoo's epochs per network (on top of the attack's :data:`EPOCH_SCALES` entry). On 3000
#: images 6 epochs left the ResNet's Adap-Patch short of its floor (BadNets and Blended reached theirs)
#: and 9 epochs reached it, at no cost in clean accuracy (figures: docs/benchmarks.md, 'Measurements
#: behind the defaults').
NET_EPOCH_SCALES: dict[str, float] = {"demo_net": 1.0, "resnet18": 1.5}

#: The network modules under :mod:`guard.demo.nets` that define each zoo network.
NET_MODULES: dict[str, str] = {"demo_net": "demo_net", "resnet18": "resnet"}


def model_file(net: str) -> str:
    """The text of a model file (the model contract's no-argument class) that builds ``net`` as the zoo does.

    The zoo's ResNet-18 is :mod:`guard.demo.nets.resnet` with ``WIDTH`` set to :data:`RESNET_WIDTH`.
    """
    import re

    from guard.demo.nets import net_file

    text = net_file(NET_MODULES[net]).read_text()
    if net == "resnet18":
        text = re.sub(r"^WIDTH = \d+$", f"WIDTH = {RESNET_WIDTH}", text, count=1, flags=re.M)
    return text


def build_net(seed: int, net: str = "demo_net") -> nn.Module:
    """A fresh ``net`` (a name in :data:`NETS`) whose initial weights depend on ``seed`` only."""
    if net not in NETS:
        raise KeyError(f"unknown network {net!r}; known: {', '.join(NETS)}")
    torch.manual_seed(seed)
    return NETS[net]()


def _epochs(epochs: int, net: str, scale: float = 1.0) -> int:
    return max(1, int(round(NET_EPOCH_SCALES[net] * scale * epochs)))


def train_clean(*, seed: int = 0, n_train: int = 3000, epochs: int = 6, n_test: int = 1000,
                data: ZooData | None = None, net: str = "demo_net") -> tuple[nn.Module, float]:
    """A clean ``net`` on the zoo data: returns ``(model, clean_accuracy)`` on the test set."""
    d = data or zoo_data(seed=seed, n_train=n_train, n_test=n_test)
    model = train(build_net(seed, net), d.x_train, d.y_train, epochs=_epochs(epochs, net), seed=seed, lr=NET_LR[net],
                  patch_augment=0.5)
    return model, accuracy(model, d.x_test, d.y_test)


def train_backdoored(name: str, *, seed: int = 0, n_train: int = 3000, epochs: int = 6, n_test: int = 1000,
                     rate: float | None = None, clean_model: nn.Module | None = None,
                     data: ZooData | None = None, net: str = "demo_net",
                     **attack_kw: object) -> tuple[nn.Module, Attack, float, float]:
    """Poison the zoo data with attack ``name`` and train a ``net`` (a name in :data:`NETS`) on it.

    Returns ``(model, attack, clean_accuracy, attack_success)``, both measured on the held-out test
    set. ``rate`` overrides the attack's demo poison rate (:data:`POISON_RATES`); the model trains
    for ``epochs`` times the attack's :data:`EPOCH_SCALES` entry; ``attack_kw`` overrides fields of
    the attack (``ATTACKS[name](**attack_kw)``). The attack is seeded with ``seed`` unless
    ``attack_kw`` says otherwise.

    TrojanNN needs a pre-trained clean model: ``clean_model`` if given (it is not modified; it should
    be the clean model of the same ``seed``/``n_train``/``net``, e.g. from :func:`train_clean`), else one
    is trained here. Its patch is fitted on that model, which is then fine-tuned on the poisoned data for
    ``TROJANNN_FINETUNE_SHARE`` of ``epochs`` (at least one), as the paper retrains the original model.
    Label-consistent poisoning perturbs its target images against the same clean model.
    """
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    d = data or zoo_data(seed=seed, n_train=n_train, n_test=n_test)
    attack = ATTACKS[name](**{"seed": seed, **attack_kw})
    poison_rate = POISON_RATES[name] if rate is None else rate
    if net not in NETS:
        raise KeyError(f"unknown network {net!r}; known: {', '.join(NETS)}")

    def base() -> nn.Module:
        return clean_model if clean_model is not None else train_clean(seed=seed, epochs=epochs, data=d, net=net)[0]

    lr = NET_LR[net]
    if isinstance(attack, TrojanNN):
        clean = base()
        attack.fit(clean, d.x_train[:512])
        xp, yp = attack.poison(d.x_train, d.y_train, rate=poison_rate, seed=seed)
        ft_epochs = _epochs(epochs, net, TROJANNN_FINETUNE_SHARE)
        model = train(copy.deepcopy(clean), xp, yp, epochs=ft_epochs, seed=seed, lr=lr, patch_augment=0.5)
    else:
        if isinstance(attack, LabelConsistent):  # its PGD perturbation reads a clean model
            attack.fit(base())
        xp, yp = attack.poison(d.x_train, d.y_train, rate=poison_rate, seed=seed)
        n_epochs = _epochs(epochs, net, EPOCH_SCALES[name])
        model = train(build_net(seed, net), xp, yp, epochs=n_epochs, seed=seed, lr=lr, patch_augment=0.5)
    return (model, attack, accuracy(model, d.x_test, d.y_test),
            attack_success(model, attack, d.x_test, d.y_test))
