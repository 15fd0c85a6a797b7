"""Session fixtures computed by child processes that run beside the rest of the suite.

A fixture that takes minutes of CPU starts its jobs as niced child processes as soon as collection
shows a test that needs it; the fixture waits for them (bounded), and the session's end stops
whatever still runs. A job writes its result as JSON under its own directory; nothing is unpickled.
Measured on a 2-core AMD EPYC: the suite keeps both cores about 95% busy, so a background job buys
little wall time by overlap; the population gains by running as two single-threaded jobs (twelve
glyph models: 5.7 minutes as two such jobs, 6.7 as one two-threaded process), and the tests that wait
for a job run last (tests/conftest.py), so the job has the whole run to finish in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class Jobs:
    """Named child processes, started once, awaited by the fixtures that need them."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def directory(self, name: str) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="guard-background-"))
        return self.root / name

    def start(self, name: str, argv: list[str], *, threads: int) -> None:
        """Run ``python ARGV`` as job ``name`` at the lowest CPU priority with ``threads`` threads."""
        if name in self.procs:
            return
        d = self.directory(name)
        d.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "OPENBLAS_NUM_THREADS": str(threads)}
        with open(d / "job.log", "w") as log:
            proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(19))
        self.procs[name] = (proc, d)

    def wait(self, name: str, timeout: float = 2400) -> Path:
        """Wait for job ``name`` (it must have been started) and return its directory."""
        proc, d = self.procs[name]
        rc = proc.wait(timeout=timeout)
        assert rc == 0, f"background job {name} exited {rc}: " + (d / "job.log").read_text()[-4000:]
        return d

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        self.procs.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


JOBS = Jobs()
