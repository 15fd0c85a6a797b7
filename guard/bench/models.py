"""The benchmark's model zoo: one model per attack plus a clean one, per network, trained once and cached.

Training dominates a benchmark run, and a rerun with the same configuration would train the very same
seeded models again, so each trained model is cached as ``CACHE/NET-NAME-seedS-KEY.safetensors`` (weights
only, no pickle; ``KEY`` is a digest of the training configuration, the network included, so a changed
configuration never reuses a stale model). TrojanNN's fitted patch (its ``pattern_`` and ``neurons_``)
travels in the same file under ``attack.*`` names, because stamping needs it and it is learned, not
derived from the seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from guard.demo.attacks import ATTACKS, Attack, TrojanNN
from guard.demo.attacks.zoo import ZooData, build_net, train_backdoored, train_clean, zoo_data
from guard.demo.train import attack_success
from guard.model import accuracy


@dataclass(frozen=True)
class ZooConfig:
    """How the zoo is trained: data sizes, epochs, the seed and the network (else the zoo's defaults).

    ``net`` names one of :data:`guard.demo.attacks.zoo.NETS` (a module of :mod:`guard.demo.nets`).
    """

    n_train: int = 3000
    n_test: int = 1000
    epochs: int = 4
    seed: int = 0
    net: str = "demo_net"

    def key(self, name: str = "clean") -> str:
        """A short digest of the configuration and of the code that trains model ``name``.

        The attack's fields and the source of its module, the zoo, training, data and network go in,
        so that a change to any of them trains afresh instead of reusing a stale model.
        """
        import importlib
        import inspect

        from guard.demo import glyphs, train
        from guard.demo.attacks import zoo

        if self.net not in zoo.NETS:
            raise KeyError(f"unknown network {self.net!r}; known: {', '.join(zoo.NETS)}")
        parts = [json.dumps(asdict(self), sort_keys=True), name]
        modules = [zoo, train, glyphs, importlib.import_module(f"guard.demo.nets.{zoo.NET_MODULES[self.net]}")]
        if name != "clean":
            attack = ATTACKS[name](seed=self.seed)
            parts.append(repr(attack))
            modules.append(inspect.getmodule(type(attack)))
            modules += [inspect.getmodule(c) for c in type(attack).__mro__[1:] if c.__module__.startswith("guard.")]
        for m in dict.fromkeys(modules):
            parts.append(inspect.getsource(m))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


@dataclass
class ZooModel:
    """One trained model of the zoo, with its attack (``None`` for the clean model) and quality figures."""

    name: str
    model: nn.Module
    attack: Attack | None
    clean_accuracy: float
    attack_success_rate: float | None
    train_seconds: float
    cached: bool




def _cache_path(cache: Path, name: str, cfg: ZooConfig) -> Path:
    return cache / f"{cfg.net}-{name}-seed{cfg.seed}-{cfg.key(name)}.safetensors"


def _load(path: Path, name: str, cfg: ZooConfig, data: ZooData) -> ZooModel:
    tensors = load_file(str(path))
    model = build_net(cfg.seed, cfg.net)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.eval()
    attack = None
    if name != "clean":
        attack = ATTACKS[name](seed=cfg.seed)
        if isinstance(attack, TrojanNN):
            attack.pattern_ = tensors["attack.pattern_"].numpy()
            attack.neurons_ = tensors["attack.neurons_"].numpy()
    acc = accuracy(model, data.x_test, data.y_test)
    asr = attack_success(model, attack, data.x_test, data.y_test) if attack is not None else None
    return ZooModel(name, model, attack, acc, asr, 0.0, True)


def _save(path: Path, zm: ZooModel) -> None:
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in zm.model.state_dict().items()}
    if isinstance(zm.attack, TrojanNN) and zm.attack.pattern_ is not None:
        tensors["attack.pattern_"] = torch.from_numpy(np.ascontiguousarray(zm.attack.pattern_))
        tensors["attack.neurons_"] = torch.from_numpy(np.ascontiguousarray(zm.attack.neurons_))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def zoo_model(name: str, cfg: ZooConfig, *, data: ZooData | None = None, cache: Path | None = None,
              clean_model: nn.Module | None = None) -> ZooModel:
    """The model of attack ``name`` (or ``"clean"``) under ``cfg``: from ``cache`` if there, else trained.

    ``clean_model`` (the clean model of the same ``cfg``) is handed to TrojanNN, which fine-tunes it, and
    to the label-consistent attack, which perturbs its poison against it (the zoo trains one otherwise).
    """
    if name != "clean" and name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    d = data or zoo_data(seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test)
    path = _cache_path(cache, name, cfg) if cache is not None else None
    if path is not None and path.is_file():
        return _load(path, name, cfg, d)
    t0 = time.perf_counter()
    if name == "clean":
        model, acc = train_clean(seed=cfg.seed, epochs=cfg.epochs, data=d, net=cfg.net)
        zm = ZooModel(name, model, None, acc, None, 0.0, False)
    else:
        model, attack, acc, asr = train_backdoored(name, seed=cfg.seed, epochs=cfg.epochs, data=d,
                                                   clean_model=clean_model, net=cfg.net)
        zm = ZooModel(name, model, attack, acc, asr, 0.0, False)
    zm.train_seconds = time.perf_counter() - t0
    if path is not None:
        _save(path, zm)
    return zm
