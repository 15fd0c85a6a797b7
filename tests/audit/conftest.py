"""Fixtures of the fleet audit's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def guard_cli():
    """``guard_cli(*args)`` runs the guard CLI in a subprocess (``cli_helpers.run_cli``)."""
    from cli_helpers import run_cli

    return run_cli
