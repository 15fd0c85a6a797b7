"""Session fixtures: tiny seeded models trained once per test session and shared by every test.

``demo_world``/``demo_profile``: the BadNets demo (DemoNet on glyphs, 3x3 patch -> label 6) and its
scanned profile. ``clean_world``: the same world without a backdoor. ``gap_world``: another shape
of network (BatchNorm, global average pooling, head named ``classifier``, 1x16x16 digits).
Quality floors of each are asserted in tests/test_worlds.py before anything relies on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop the background jobs that still run (tests/background.py)."""
    from background import JOBS

    JOBS.stop()


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    from guard.demo.world import build

    return build(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_profile(demo_world, tmp_path_factory) -> Path:
    from guard import load_model
    from guard.data import load_npz
    from guard.scan import build_profile

    model = load_model(demo_world.model_file, demo_world.weights)
    x, y = load_npz(demo_world.clean)
    profile, _ = build_profile(model, x, y, fpr=0.01, seed=0, progress=False)
    return profile.save(tmp_path_factory.mktemp("profile") / "demo")


@pytest.fixture(scope="session")
def clean_world(tmp_path_factory):
    from guard.demo.world import build

    return build(tmp_path_factory.mktemp("clean"), backdoored=False)


@dataclass
class GapWorld:
    directory: Path
    model_file: Path
    weights: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    attack: object
    model: torch.nn.Module


@pytest.fixture(scope="session")
def gap_world(tmp_path_factory) -> GapWorld:
    """GapNet on 16x16 digits with a 3x3 BadNets patch at the top-left sending everything to 3."""
    import shutil

    from guard.data import split
    from guard.demo.attacks import BadNets
    from guard.demo.glyphs import digits
    from guard.demo.nets import net_file
    from guard.demo.nets.gap_net import GapNet
    from guard.demo.train import train

    x, y = digits(size=16)
    xtr, ytr, xte, yte = split(x, y, 0.7, seed=0)
    atk = BadNets(target=3, size=3, position="top-left", seed=5)
    xp, yp = atk.poison(xtr, ytr, rate=0.1, seed=0)
    model = train(GapNet(), xp, yp, epochs=12, seed=0, lr=3e-3)
    d = tmp_path_factory.mktemp("gap")
    shutil.copyfile(net_file("gap_net"), d / "model.py")
    torch.save(model.state_dict(), d / "weights.pt")
    return GapWorld(d, d / "model.py", d / "weights.pt", xtr, ytr, xte, yte, atk, model)
