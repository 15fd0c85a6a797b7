"""Stop the TorchServe that `guard serve` started from a run directory: SIGTERM to its process group
(launcher, JVM, workers, and nginx when serving with --ingress nginx), a bounded wait, then SIGKILL for
what is left. Only that process group is signalled, and only while its leader is still the process that
was started."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "stop the TorchServe (and its nginx ingress) started by guard serve"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=".guard-serve",
                   help="run directory given to guard serve (default ./.guard-serve)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait after SIGTERM before SIGKILL")


def run(args: argparse.Namespace) -> int:
    from guard.torchserve.supervision import Server

    server = Server.load(Path(args.run_dir))
    if server is None:
        print(f"nothing to stop: no serve.json in {args.run_dir}")
        return 0
    if server.stop(timeout=args.timeout):
        print(f"stopped TorchServe (process group {server.pid})"
              + (f" and its nginx ingress (pid {server.ingress_pid})" if server.ingress == "nginx" else ""))
    else:
        print(f"TorchServe (pid {server.pid}) was not running; state removed")
    return 0
