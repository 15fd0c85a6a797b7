"""Ray clusters of several nodes on this host, started and killed by the code that needs them (the fleet
scaling bench and the fleet tests)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


class LoopbackCluster:
    """``nodes`` Ray nodes of ``cpus`` CPUs each on this host (``ray start --head`` and ``ray start --address``),
    with a fresh auth token; every process they started is killed on exit (:meth:`kill_node` kills one
    earlier, as a node that dies does). ``env`` holds what a driver needs to reach it; ``extra_env`` is added
    to it (Ray's own settings, e.g. a faster health check).

    Every node has a loopback address of its own (the head 127.0.0.2, the next 127.0.0.3, ...), as the machines of
    a real cluster do, so all of the cluster's traffic stays on the loopback interface. Not 127.0.0.1: Ray
    replaces that address (and ``localhost``) by the host's interface address for a node that joins a cluster
    and for the cluster address it joins; other loopback addresses it keeps as given."""

    def __init__(self, nodes: int, *, cpus: int = 1, extra_env: dict[str, str] | None = None):
        self.nodes, self.cpus = nodes, cpus
        self.tmp = tempfile.mkdtemp(prefix="gb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=self.tmp,
                        RAY_USAGE_STATS_ENABLED="0", **(extra_env or {}))
        with socket.socket() as s:
            s.bind((self.node_ip(0), 0))
            self.address = f"{self.node_ip(0)}:{s.getsockname()[1]}"
        self._procs: list[subprocess.Popen] = []

    @staticmethod
    def node_ip(i: int) -> str:
        """Node ``i``'s own loopback address (0: the head)."""
        if not 0 <= i < 250:
            raise ValueError(f"node index {i} is outside 0..249")
        return f"127.0.0.{i + 2}"

    def _alive(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        return int(p.stdout.split()[-1]) if p.returncode == 0 and p.stdout.strip() else 0

    def __enter__(self) -> LoopbackCluster:
        ray = str(Path(sys.executable).with_name("ray"))
        common = [f"--num-cpus={self.cpus}", "--block", "--disable-usage-stats"]
        head = [ray, "start", "--head", f"--port={self.address.rsplit(':', 1)[1]}", "--include-dashboard=false",
                f"--temp-dir={self.tmp}", *common]
        try:
            for i in range(self.nodes):
                cmd = head if i == 0 else [ray, "start", f"--address={self.address}", *common]
                cmd.append(f"--node-ip-address={self.node_ip(i)}")
                self._procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL, start_new_session=True))
                deadline = time.monotonic() + 120
                while self._alive() < i + 1:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Ray node {i + 1} did not join within 120 s")
                    time.sleep(1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def node_processes(self, i: int) -> set[int]:
        """Every process of node ``i`` (0: the head): its ``ray start``, raylet, workers."""
        return set(descendants(self._procs[i].pid))

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of node ``i``, as when its machine dies."""
        for pid in reversed(descendants(self._procs[i].pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._procs[i].wait(timeout=30)

    def __exit__(self, *exc) -> None:
        for i in range(len(self._procs)):
            self.kill_node(i)
        self._procs = []
        shutil.rmtree(self.tmp, ignore_errors=True)
