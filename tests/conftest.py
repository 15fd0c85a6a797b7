"""Session fixtures: tiny seeded models trained once per test session and shared by every test.

``demo_world``/``demo_profile``: the BadNets demo (DemoNet on glyphs, 3x3 patch -> label 6) and its
profile, written by ``guard scan`` (``demo_scan`` keeps the command's output). ``clean_world``: the
same world without a backdoor (``clean_scan``: its default scan). ``gap_world``: another shape of
network (BatchNorm, global average pooling, head named ``classifier``, 1x16x16 digits).
Quality floors of each are asserted in tests/test_worlds.py before anything relies on them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from guard._malloc import retain_freed_memory

torch.set_num_threads(2)
retain_freed_memory()  # as every guard command does: the scans trained and run here reuse their buffers


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the tests that wait for a background job (tests/background.py) last, so that the job has the
    whole run to finish beside the other tests instead of holding both cores while the suite waits."""
    from background import WAITING_FIXTURES

    waits = [item for item in items if set(WAITING_FIXTURES) & set(getattr(item, "fixturenames", ()))]
    if waits:
        items[:] = [item for item in items if item not in waits] + waits


#: The transformer of another layout than the bundled ViT (timm's names, tokens averaged instead of a class
#: token: ``tests/nets/timm_vit.py``, patch 4, width 64, depth 2), trained on the glyph task with the BadNets
#: patch: 25 epochs of 4000 images, about 75 s of two cores, so it is built by a background job (one thread).
VIT_WORLD = {"seed": 1, "epochs": 25, "lr": 3e-3, "n_train": 4000, "n_clean": 1000, "n_holdout": 1000}


def _start_vit_world() -> None:
    from background import JOBS

    source = (Path(__file__).parent / "nets" / "timm_vit.py").read_text()
    JOBS.start_world("vit-world", threads=1, source=source, **VIT_WORLD)


def pytest_collection_finish(session) -> None:
    from background import needed

    if needed(session, "vit_world"):
        _start_vit_world()


@pytest.fixture
def here(capfd):
    """``here(ARGS)``: ``guard ARGS`` in this process (:func:`cli_helpers.run_cli_here`), for a test's refusals
    after its first, which runs as a process."""
    from cli_helpers import run_cli_here

    return lambda *args: run_cli_here(capfd, *args)


@pytest.fixture(scope="session")
def vit_world():
    """:data:`VIT_WORLD`, built by a background job (tests/background.py) beside the rest of the suite."""
    from background import JOBS

    _start_vit_world()
    return JOBS.world("vit-world")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop the background jobs that still run (tests/background.py)."""
    from background import JOBS

    JOBS.stop()


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    from guard.demo.world import build

    return build(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def arch_worlds(tmp_path_factory):
    """The other layouts' worlds by name (tests/arch_helpers.py), each built when a test first asks for it."""
    from arch_helpers import ArchWorlds

    return ArchWorlds(tmp_path_factory.mktemp("arch"))


@dataclass
class DemoScan:
    """``guard scan --json`` of the demo model, as a user runs it (default budget, FPR 1%, seed 0)."""

    profile: Path
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def demo_scan(demo_world, tmp_path_factory) -> DemoScan:
    from cli_helpers import run_cli

    out = tmp_path_factory.mktemp("profile") / "demo"
    proc = run_cli("scan", "--model-file", str(demo_world.model_file), "--weights", str(demo_world.weights),
                   "--data", str(demo_world.clean), "--out", str(out), "--json")
    assert proc.returncode in (0, 1) and (out / "profile.json").is_file(), proc.stderr[-2000:]
    return DemoScan(out, proc)


@pytest.fixture(scope="session")
def demo_profile(demo_scan) -> Path:
    """The demo model's profile, written by ``guard scan`` (the CLI is what every deployment runs)."""
    return demo_scan.profile


@pytest.fixture(scope="session")
def clean_world(tmp_path_factory):
    from guard.demo.world import build

    return build(tmp_path_factory.mktemp("clean"), backdoored=False)


@dataclass
class CleanScan:
    """The clean world's default scan: the model, its profile and summary, and the Neural Cleanse fit
    inside it (the profile's fit half, seed 0, the default budget)."""

    model: torch.nn.Module
    profile: object
    summary: dict
    nc: object


@pytest.fixture(scope="session")
def clean_scan(clean_world) -> CleanScan:
    from guard import load_model
    from guard.data import load_npz
    from guard.scan import NeuralCleanse, build_profile

    model = load_model(clean_world.model_file, clean_world.weights)
    x, y = load_npz(clean_world.clean)
    nc = NeuralCleanse(seed=0, progress=False)
    profile, summary = build_profile(model, x, y, fpr=0.01, seed=0, progress=False, nc=nc)
    return CleanScan(model, profile, summary, nc)


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
