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


def run_cli_here(capfd, *args: object) -> subprocess.CompletedProcess:
    """``guard ARGS`` in this process, its output read from the file descriptors (pytest's ``capfd``).

    For the many refusals a test checks in a row: each costs a process start and torch's import as a
    subprocess (about 2.5 s). Each such test still runs one of its cases through :func:`run_cli`, so the
    process's own exit code and stderr are checked too."""
    from guard.cli.main import main

    capfd.readouterr()
    argv = [str(a) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors (and --help); the process's exit status for any code
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["guard", *argv], code, out, err)
