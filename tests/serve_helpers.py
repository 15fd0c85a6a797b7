"""``guard serve`` for the integration tests: start the real TorchServe through the CLI, always stop it.

Imported as ``serve_helpers`` (tests/ is on ``sys.path``, as for ``prom_helpers``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from guard.torchserve.supervision import Server

BIN = Path(sys.executable).parent


def guard_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``guard ARGS`` from this environment's console script."""
    return subprocess.run([str(BIN / "guard"), *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def guard_serve(store: Path, run_dir: Path, *args: str) -> Iterator[tuple[Server, str]]:
    """``guard serve --model-store STORE --ports auto --run-dir RUN_DIR ARGS``; yields the server and what
    serve printed. On exit ``guard stop`` must succeed and leave nothing alive; whatever happened, the
    server's process group is stopped in the ``finally``."""
    try:
        done = guard_cli("serve", "--model-store", str(store), "--ports", "auto", "--run-dir", str(run_dir),
                         "--timeout", "300", *args, timeout=420)
        assert done.returncode == 0, done.stdout + done.stderr
        srv = Server.load(run_dir)
        assert srv is not None and srv.alive()
        yield srv, done.stdout
        stopped = guard_cli("stop", "--run-dir", str(run_dir), timeout=120)
        assert stopped.returncode == 0 and "stopped TorchServe" in stopped.stdout, stopped.stdout + stopped.stderr
        assert not srv.alive()
    finally:
        left = Server.load(run_dir)
        if left is not None:
            left.stop()


def decided_inputs(world, profile_dir: Path, n_clean: int, n_triggered: int) -> dict:
    """Held-out clean images the offline guard passes and triggered ones it rejects, rounded to the 4
    decimals a JSON request carries, so the endpoint must reach the same verdicts."""
    import numpy as np

    from guard import Guard, Profile, load_model
    from guard.data import load_npz

    guard = Guard(load_model(world.model_file, world.weights), Profile.load(profile_dir))
    xh, _ = load_npz(world.holdout)
    xt, _ = load_npz(world.triggered)
    xh = np.round(xh[:n_clean], 4).astype(np.float32)
    xt = np.round(xt[:n_triggered], 4).astype(np.float32)
    return {"clean": xh[[d.verdict == "pass" for d in guard.predict(xh)]],
            "triggered": xt[[d.verdict == "rejected" for d in guard.predict(xt)]]}


def require_nginx() -> str:
    """``nginx`` on PATH: installed with apt-get (Debian's package) when missing and the tests run as root,
    as CI does; skipped otherwise. A failed apt-get fails the test."""
    found = shutil.which("nginx")
    if found:
        return found
    if shutil.which("apt-get") is None or (hasattr(os, "geteuid") and os.geteuid() != 0):
        pytest.skip("nginx is not on PATH and cannot be installed here (run: sudo apt-get install -y nginx)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = shutil.which("nginx")
    if not found:
        pytest.fail("apt-get installed nginx but it is not on PATH")
    return found
