"""The demo world: a seeded backdoored (or clean) network on the glyph task, written as user files.

``build(out_dir)`` writes exactly what a user would bring: ``model.py`` (a copy of the model file),
``weights.pt`` (state_dict), ``clean.npz`` (clean images for the scan), ``holdout.npz`` (other
clean images) and ``triggered.npz`` (held-out non-target images with the trigger; ``y`` holds their
true labels). Everything is seeded and small enough to build in seconds on 2 cores (figures:
docs/benchmarks.md, 'Measurements behind the defaults').
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guard.demo.attacks import Attack, BadNets
from guard.demo.glyphs import glyphs
from guard.demo.nets import net_file
from guard.demo.train import attack_success, train
from guard.model import accuracy

DEMO_TARGET = 6
DEMO_SEED = 3
"""The demo's seed. On demo builds of seeds 0-3 Neural Cleanse's log-scale index stands the target
out on every seed, but the glyph task has a naturally cheap class ("wedge", label 8) whose reversed
mask is close to the trigger's on some seeds, so that it is flagged beside the target or the target
is missed on the raw scale. Seed 3 separates cleanly, which is what a demo should show (figures:
docs/benchmarks.md, 'Measurements behind the defaults'); the test population (tests/scan) measures
how the scans do across seeds."""


@dataclass
class DemoWorld:
    directory: Path
    model_file: Path
    weights: Path
    clean: Path
    holdout: Path
    triggered: Path
    clean_accuracy: float
    attack_success: float
    attack: Attack | None


def built(out_dir: str | Path) -> DemoWorld | None:
    """The world :func:`build` already wrote in ``out_dir`` (its ``world.json`` is there), or None: how the bench
    reuses its trained worlds from one run to the next."""
    out = Path(out_dir)
    meta = out / "world.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return DemoWorld(out, out / "model.py", out / "weights.pt", out / "clean.npz", out / "holdout.npz",
                     out / "triggered.npz", info["clean_accuracy"], info["attack_success"], None)


def net_source(net: str, *, classes: int = 10, **constants: object) -> str:
    """The bundled model file ``net`` with its module constants set (``NUM_CLASSES`` to ``classes``, and
    e.g. ``WIDTH=8``): how the demo and tests write a variant of a network as a user's model file."""
    import re

    text = net_file(net).read_text()
    for name, value in {"NUM_CLASSES": classes, **constants}.items():
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, count=1, flags=re.M)
        if n == 0 and not (name == "NUM_CLASSES" and classes == 10):
            raise ValueError(f"{net}.py has no module constant {name}")
    return text


def build(out_dir: str | Path, *, attack: Attack | None = None, backdoored: bool = True, seed: int = DEMO_SEED,
          n_train: int = 6000, n_clean: int = 2000, n_holdout: int = 1000, epochs: int = 5,
          poison_rate: float = 0.1, net: str = "demo_net", classes: int = 10, size: int = 32,
          lr: float = 2e-3, source: str | None = None, **constants: object) -> DemoWorld:
    """Train and write a demo model (BadNets 3x3 patch to label 6 by default) and its data files.

    ``net`` names a bundled model file (:func:`guard.demo.nets.net_file`), written with ``classes``
    and the module ``constants`` given; ``classes`` 100 or 1000 composes glyphs (:func:`glyphs`).
    ``source`` is a model file's text to train instead of a bundled one (written as it is; its network
    class is picked as :func:`guard.model.load_model` picks it), e.g. a layout this package does not ship.
    """
    from guard.model import model_class

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.py").write_text(net_source(net, classes=classes, **constants) if source is None else source)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x, y = glyphs(n_train, seed=seed * 10 + 1, size=size, classes=classes)
    xc, yc = glyphs(n_clean, seed=seed * 10 + 2, size=size, classes=classes)
    xh, yh = glyphs(n_holdout, seed=seed * 10 + 3, size=size, classes=classes)
    atk = (attack or BadNets(target=DEMO_TARGET)) if backdoored else None
    if atk is not None:
        x, y = atk.poison(x, y, rate=poison_rate, seed=seed)
    cls = model_class(out / "model.py")  # picking among several classes builds them: before seeding
    torch.manual_seed(seed)  # initial weights depend on the seed only, not on what ran before
    model = train(cls(), x, y, epochs=epochs, seed=seed, lr=lr, patch_augment=0.5)
    torch.save(model.state_dict(), out / "weights.pt")
    np.savez(out / "clean.npz", x=xc, y=yc)
    np.savez(out / "holdout.npz", x=xh, y=yh)
    probe = atk or BadNets(target=DEMO_TARGET)
    keep = probe.victims(yh)
    np.savez(out / "triggered.npz", x=probe.stamp(xh[keep]), y=yh[keep])
    acc = accuracy(model, xh, yh)
    asr = attack_success(model, probe, xh, yh)
    (out / "world.json").write_text(json.dumps({
        "backdoored": backdoored, "target": probe.target if backdoored else None,
        "attack": type(probe).__name__ if backdoored else None, "seed": seed,
        "net": net if source is None else "model file", "classes": classes,
        "clean_accuracy": acc, "attack_success": asr}, indent=2) + "\n")
    return DemoWorld(out, out / "model.py", out / "weights.pt", out / "clean.npz", out / "holdout.npz",
                     out / "triggered.npz", acc, asr, atk)
