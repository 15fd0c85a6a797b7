"""The guard CLI in a subprocess, as a CI job runs it (shared by the test packages' fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """``guard ARGS`` in a subprocess of this interpreter."""
    env = dict(os.environ, GUARD_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "guard.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
