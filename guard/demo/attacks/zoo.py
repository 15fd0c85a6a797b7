"""Train the attack zoo on the glyph demo world: one backdoored DemoNet per attack, and clean ones.

Used by the tests (quality floors per attack) and the benchmark (detection rates per attack, clean
models as the negative class). Everything is seeded by ``seed``: the data (the same seeds as
:mod:`guard.demo.world`), the attack's own randomness, the poisoned subset and training. Training
uses ``patch_augment=0.5`` as the demo world does, so a change of label takes a large perturbation
unless the model has a backdoor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.demo.attacks._base import Attack
from guard.demo.attacks._registry import ATTACKS, EPOCH_SCALES, POISON_RATES
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


def _net(seed: int) -> nn.Module:
    """A fresh DemoNet whose initial weights depend on ``seed`` only (not on what ran before)."""
    from guard.demo.nets.demo_net import DemoNet

    torch.manual_seed(seed)
    return DemoNet()


def train_clean(*, seed: int = 0, n_train: int = 3000, epochs: int = 6, n_test: int = 1000,
                data: ZooData | None = None) -> tuple[nn.Module, float]:
    """A clean DemoNet on the zoo data: returns ``(model, clean_accuracy)`` on the test set."""
    d = data or zoo_data(seed=seed, n_train=n_train, n_test=n_test)
    model = train(_net(seed), d.x_train, d.y_train, epochs=epochs, seed=seed, lr=LR, patch_augment=0.5)
    return model, accuracy(model, d.x_test, d.y_test)


def train_backdoored(name: str, *, seed: int = 0, n_train: int = 3000, epochs: int = 6, n_test: int = 1000,
                     rate: float | None = None, clean_model: nn.Module | None = None,
                     data: ZooData | None = None,
                     **attack_kw: object) -> tuple[nn.Module, Attack, float, float]:
    """Poison the zoo data with attack ``name`` and train a DemoNet on it.

    Returns ``(model, attack, clean_accuracy, attack_success)``, both measured on the held-out test
    set. ``rate`` overrides the attack's demo poison rate (:data:`POISON_RATES`); the model trains
    for ``epochs`` times the attack's :data:`EPOCH_SCALES` entry; ``attack_kw`` overrides fields of
    the attack (``ATTACKS[name](**attack_kw)``). The attack is seeded with ``seed`` unless
    ``attack_kw`` says otherwise.

    TrojanNN needs a pre-trained clean model: ``clean_model`` if given (it is not modified; it should
    be the clean model of the same ``seed``/``n_train``, e.g. from :func:`train_clean`), else one is
    trained here. Its patch is fitted on that model, which is then fine-tuned on the poisoned data for
    ``TROJANNN_FINETUNE_SHARE`` of ``epochs`` (at least one), as the paper retrains the original model.
    """
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    d = data or zoo_data(seed=seed, n_train=n_train, n_test=n_test)
    attack = ATTACKS[name](**{"seed": seed, **attack_kw})
    poison_rate = POISON_RATES[name] if rate is None else rate
    if isinstance(attack, TrojanNN):
        base = clean_model if clean_model is not None else train_clean(seed=seed, epochs=epochs, data=d)[0]
        attack.fit(base, d.x_train[:512])
        xp, yp = attack.poison(d.x_train, d.y_train, rate=poison_rate, seed=seed)
        ft_epochs = max(1, int(round(TROJANNN_FINETUNE_SHARE * epochs)))
        model = train(copy.deepcopy(base), xp, yp, epochs=ft_epochs, seed=seed, lr=LR, patch_augment=0.5)
    else:
        xp, yp = attack.poison(d.x_train, d.y_train, rate=poison_rate, seed=seed)
        n_epochs = max(1, int(round(EPOCH_SCALES[name] * epochs)))
        model = train(_net(seed), xp, yp, epochs=n_epochs, seed=seed, lr=LR, patch_augment=0.5)
    return (model, attack, accuracy(model, d.x_test, d.y_test),
            attack_success(model, attack, d.x_test, d.y_test))
