"""Session fixtures computed by child processes that run beside the rest of the suite.

A fixture that takes minutes of CPU starts its jobs as niced child processes as soon as collection
shows a test that needs it; the fixture waits for them (bounded), and the session's end stops
whatever still runs. A job writes its result as JSON (or a world's files) under its own directory;
nothing is unpickled. The tests that wait for a job run last (tests/conftest.py), so the jobs have the
whole run to finish in. Jobs: the scan population (tests/scan/conftest.py) and the trained transformer world
(tests/conftest.py).

Why: sampled every 10 s on a 2-core AMD EPYC, the suite's first half keeps both cores busy, but its
second half (servers starting, Ray workers, timeouts running out) leaves about a sixth of the CPU idle
(a tenth over the whole run); work that no test needs until the end fills that time instead of adding
to the suite's length. A job runs on one thread: a two-thread job at the lowest priority stalls at every
barrier while the suite holds the cores (two such jobs used four times the CPU their work takes alone).
Its model is then trained with other numerics than in the suite's two-thread process: only worlds whose
floors hold either way are built here (the zoo's Blended model, for one, falls under its floors when trained
on one thread: it stays in the suite's process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Fixtures that wait for a background job: the tests that use them run last (tests/conftest.py).
WAITING_FIXTURES = ("population", "vit_world")

def needed(session, fixture: str) -> bool:
    """Whether the collected session (not ``--collect-only``) has a test that uses ``fixture``: its job is
    worth starting as soon as collection ends."""
    return not session.config.option.collectonly and any(fixture in getattr(item, "fixturenames", ())
                                                         for item in session.items)


_BUILD = ("import json, sys\nfrom guard.demo.world import build\n"
          "build(sys.argv[1], **json.loads(sys.argv[2]))\n")


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

    def start_world(self, name: str, *, threads: int, **build_kwargs: object) -> None:
        """Job ``name`` writes :func:`guard.demo.world.build` (``build_kwargs``, JSON values) under its directory."""
        self.start(name, ["-c", _BUILD, str(self.directory(name) / "world"), json.dumps(build_kwargs)],
                   threads=threads)

    def world(self, name: str, timeout: float = 2400):
        """The world job ``name`` built (:func:`guard.demo.world.built`; its attack is not kept)."""
        from guard.demo.world import built

        w = built(self.wait(name, timeout) / "world")
        assert w is not None, f"background job {name} wrote no world"
        return w

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
