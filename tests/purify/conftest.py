"""Fixtures of the purification tests: the session's BadNets demo world and its profile (from
tests/conftest.py) under the names the tests use, its model, data and profile loaded, and the CLI in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import run_cli


@pytest.fixture(scope="session")
def badnets_world(demo_world):
    return demo_world


@pytest.fixture(scope="session")
def badnets_profile(demo_profile) -> Path:
    return demo_profile


@pytest.fixture(scope="module")
def demo(badnets_world, badnets_profile):
    """``(model, x, y, x_holdout, y_holdout, profile, attack)`` of the session's BadNets world."""
    from guard.data import load_npz
    from guard.model import load_model
    from guard.profile import Profile

    model = load_model(badnets_world.model_file, badnets_world.weights)
    x, y = load_npz(badnets_world.clean)
    xh, yh = load_npz(badnets_world.holdout)
    return model, x, y, xh, yh, Profile.load(badnets_profile), badnets_world.attack


@pytest.fixture(scope="session")
def guard_cli():
    """``guard_cli(*args)`` runs the guard CLI in a subprocess."""
    return run_cli
