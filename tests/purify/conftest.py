"""Fixtures of the purification tests: the session's BadNets demo world and its profile (from
tests/conftest.py) under the names the tests use, and the CLI in a subprocess."""

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


@pytest.fixture(scope="session")
def guard_cli():
    """``guard_cli(*args)`` runs the guard CLI in a subprocess."""
    return run_cli
