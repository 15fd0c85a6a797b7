"""The worlds of other layouts than DemoNet (tests/conftest.py's ``arch_worlds``): a CIFAR-style ResNet-18
layout at width 8, an all-convolutional net without ``nn.Linear`` and a net that normalises its input inside
``forward``, trained on the glyph task with the BadNets patch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

#: (bundled model file's module constants, training epochs, learning rate) per layout; every world with
#: :data:`ARCH_TRAIN`'s sizes and seed 1.
ARCHS = {
    "resnet": ({"WIDTH": 8}, 4, 4e-3),
    "allconv": ({}, 5, 4e-3),
    "normalized": ({}, 6, 4e-3),
}
ARCH_TRAIN = {"n_train": 2500, "n_clean": 1200, "n_holdout": 500}


class ArchWorlds(Mapping):
    """The :data:`ARCHS` worlds by name, each built the first time a test asks for it: the ResNet-18 layout is
    shared by the architecture and the purification tests, the other two only the former need."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict = {}

    def __getitem__(self, name: str):
        from guard.demo.world import build

        if name not in ARCHS:
            raise KeyError(name)
        if name not in self.built:
            constants, epochs, lr = ARCHS[name]
            self.built[name] = build(self.root / name, net=name, seed=1, epochs=epochs, lr=lr, **ARCH_TRAIN,
                                     **constants)
        return self.built[name]

    def __iter__(self):
        return iter(ARCHS)

    def __len__(self) -> int:
        return len(ARCHS)
