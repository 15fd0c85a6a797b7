"""`guard audit --models` on real Ray: a local instance with workers that crash, crash for good or hang,
and a two-node cluster on loopback with a node killed mid-run. Every model gets exactly one row.

Every Ray process here is started by the test with token authentication (a fresh token), under a short
temporary directory of its own, and is killed by pid at the end. The local instance runs in Ray's single-host
mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: it advertises 127.0.0.1, so its traffic stays on loopback).
The two-node cluster is :class:`guard.bench.ray_cluster.LoopbackCluster`: a multi-node cluster refuses that
mode, so each node has a loopback address of its own (127.0.0.2, 127.0.0.3), and the test checks that every
connection its processes hold stays on the loopback interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = Path(sys.executable).with_name("ray")


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it (little-endian 32-bit words), IPv4-mapped IPv6 unwrapped."""
    raw = b"".join(int(hex_address[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(hex_address), 8))
    address = ipaddress.ip_address(raw)
    return getattr(address, "ipv4_mapped", None) or address


def _connections(pids: set[int]) -> list[tuple[str, str]]:
    """(local, remote) address of every established TCP connection the processes ``pids`` hold."""
    inodes = set()
    for pid in pids:
        try:
            inodes.update(os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
                          if os.readlink(fd).startswith("socket:["))
        except OSError:  # the process ended meanwhile
            continue
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and cols[3] == "01":  # 01: ESTABLISHED
                out.append((str(_address(cols[1].split(":")[0])), str(_address(cols[2].split(":")[0]))))
    return out


@pytest.fixture
def ray_env():
    """The environment every Ray process and the driver of one test share, and its temporary directory."""
    tmp = tempfile.mkdtemp(prefix="gr", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=tmp, TMPDIR=tmp,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3", GUARD_PROGRESS="1")
    try:
        yield env, tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_dir(root: Path, world, variants: dict[str, str]) -> Path:
    """One folder per model: the demo model's file with ``variants[name]`` run first at its import."""
    source = Path(world.model_file).read_text()
    for name, prologue in variants.items():
        (root / name).mkdir(parents=True)
        (root / name / "model.py").write_text(prologue + "\n" + source)
        shutil.copy(world.weights, root / name / "weights.pt")
    return root


def _crash_once(marker: Path) -> str:
    return (f"import os, pathlib\n_m = pathlib.Path({str(marker)!r})\n"
            "if not _m.exists():\n    _m.write_text(str(os.getpid()))\n    os._exit(1)\n")


def _fleet(env, models: Path, out: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "guard.cli", "audit", "--models", str(models), "--methods", "df-tnd",
                           "--out", str(out), "--json", *extra], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_local_ray_retries_lost_workers_and_gives_every_model_one_row(demo_world, clean_world, ray_env, tmp_path):
    env, tmp = ray_env
    marker = tmp_path / "crashed-once"
    models = _model_dir(tmp_path / "models", demo_world, {
        "backdoored": "", "crash-once": _crash_once(marker), "always-crash": "import os\nos._exit(1)\n",
        "hangs": "import time\ntime.sleep(600)\n"})
    (models / "clean").mkdir()
    shutil.copy(clean_world.model_file, models / "clean" / "model.py")
    shutil.copy(clean_world.weights, models / "clean" / "weights.pt")
    (models / "broken").mkdir()
    (models / "broken" / "model.py").write_text("raise ImportError('no such layer')\n")
    shutil.copy(demo_world.weights, models / "broken" / "weights.pt")

    proc = _fleet(env, models, tmp_path / "out", "--max-retries", "1", "--timeout", "20")
    assert proc.returncode == 2, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    rows = {r["name"]: r for r in doc["rows"]}
    assert sorted(rows) == ["always-crash", "backdoored", "broken", "clean", "crash-once", "hangs"]
    assert len(doc["rows"]) == 6 and doc["duplicates_dropped"] == 0
    assert doc["executor"]["kind"] == "ray" and doc["executor"]["slots"] >= 1
    # the worker that crashed was replaced and the model audited once, with the same answer as its twin
    crashed_pid = int(marker.read_text())
    assert rows["crash-once"]["verdict"] == rows["backdoored"]["verdict"] != "error"
    assert rows["crash-once"]["suspect_labels"] == rows["backdoored"]["suspect_labels"]
    assert rows["crash-once"]["pid"] != crashed_pid
    # the copy of the model's files that the crashed worker could not remove was swept
    assert not list(Path(tmp).glob(f"guard-fleet-{crashed_pid}-*")), sorted(Path(tmp).iterdir())
    assert rows["always-crash"]["verdict"] == "error" and "lost on each of 2 attempts" in rows["always-crash"]["error"]
    assert rows["hangs"]["verdict"] == "error" and "timed out after 20 s" in rows["hangs"]["error"]
    assert rows["broken"]["error"].endswith("ImportError: no such layer")
    assert rows["clean"]["verdict"] in ("clean", "backdoored")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*rows, "metrics.prom", "summary.html", "summary.json"])
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(progress) == 6 and progress[-1].startswith("[6/6]")


def test_two_node_cluster_loses_a_node_mid_run_and_loses_no_model(demo_world, tmp_path):
    """`ray start --head` and a second node, one CPU each; while a model's audit runs on the second node that
    node is killed (its raylet and workers, SIGKILL). Ray reruns the model on the head: one row per model."""
    from guard.bench.ray_cluster import LoopbackCluster

    markers = tmp_path / "started"
    markers.mkdir()
    slow = ("import os, pathlib, time\n"
            f"pathlib.Path({str(markers)!r}, f'{{os.getpid()}}-{{time.time_ns()}}').write_text('')\ntime.sleep(4)\n")
    models = _model_dir(tmp_path / "models", demo_world, {f"m{i}": slow for i in range(4)})
    health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    with LoopbackCluster(2, extra_env=health) as cluster:
        driver = subprocess.Popen([sys.executable, "-m", "guard.cli", "audit", "--models", str(models), "--methods",
                                   "df-tnd", "--out", str(tmp_path / "out"), "--json", "--address", cluster.address],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
        try:
            victim = None
            deadline = time.monotonic() + 120
            while victim is None:  # a model started on the second node: kill that node under it
                assert time.monotonic() < deadline and driver.poll() is None, "no audit ran on the second node"
                on_node2 = cluster.node_processes(1)
                victim = next((pid for pid in (int(m.name.split("-")[0]) for m in markers.iterdir())
                               if pid in on_node2), None)
                time.sleep(0.2)
            held = _connections(cluster.node_processes(0) | cluster.node_processes(1) | {driver.pid})
            cluster.kill_node(1)
            out, err = driver.communicate(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait(timeout=30)
    assert driver.returncode in (0, 1), err[-3000:]
    assert held and all(ipaddress.ip_address(a).is_loopback for pair in held for a in pair), held
    assert {a for pair in held for a in pair} >= {"127.0.0.2", "127.0.0.3"}  # both nodes' own addresses in use
    doc = json.loads(out)
    assert [r["name"] for r in doc["rows"]] == ["m0", "m1", "m2", "m3"] and doc["duplicates_dropped"] == 0
    assert doc["executor"]["nodes"] == 2
    assert all(r["verdict"] != "error" for r in doc["rows"]), doc["rows"]
    assert len({(r["verdict"], tuple(r["suspect_labels"])) for r in doc["rows"]}) == 1  # four copies, one answer
    assert victim not in {r["pid"] for r in doc["rows"]}  # the killed worker's audit was redone elsewhere
    assert len(list(markers.iterdir())) >= 5  # four audits and at least one rerun started (one file each)
