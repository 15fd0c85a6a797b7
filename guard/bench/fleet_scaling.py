"""How a fleet audit scales: audits per hour of a fixed set of small models in this process, on a one-node and
on a two-node Ray cluster (one CPU per node, one single-threaded audit per CPU), and what Ray adds per model.

``python -m guard.bench.fleet_scaling --work DIR [--models 8] [--max-rounds 40]`` builds the demo model once,
copies it into ``--models`` folders, and runs ``guard audit --models`` (Neural Cleanse at ``--max-rounds``, on the
demo's clean images) three ways, each as a user runs it (a CLI process, timed whole): ``--local``; against a
cluster started here with ``ray start --head`` (one CPU); against a head and a second node (one CPU each). The
clusters run on this host (each node on a loopback address of its own) and are killed by pid after their run. It
prints one JSON document: each run's wall seconds, audits per hour and the rows' own audit seconds; the
two-node speed-up over one node; and Ray's cost per model (one node's wall time over the local run's, per
model, also as a share of one model's audit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from guard.bench.ray_cluster import LoopbackCluster


def _audit(models: Path, data: Path, out: Path, max_rounds: int, extra: list[str], env: dict | None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "guard.cli", "audit", "--models", str(models), "--methods", "nc",
                           "--max-rounds", str(max_rounds), "--data", str(data), "--out", str(out), "--force", "--json",
                           *extra], capture_output=True, text=True, env=env, timeout=7200)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"guard audit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    rows = doc["rows"]
    return {"wall_s": round(wall, 2), "audits_per_hour": round(len(rows) / wall * 3600, 1),
            "rows_audit_s": round(sum(r["seconds"] for r in rows), 2), "verdicts": doc["verdicts"],
            "nodes": doc["executor"].get("nodes"), "slots": doc["executor"].get("slots"),
            "hosts_pids": sorted({r["pid"] for r in rows})}


def measure(work: Path, *, n_models: int = 8, max_rounds: int = 40) -> dict:
    """The three runs (see the module) on ``n_models`` copies of the demo model."""
    from guard.demo.world import build, built

    world = built(work / "world") or build(work / "world")
    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    for i in range(n_models):
        (models / f"m{i}").mkdir(parents=True)
        shutil.copy(world.model_file, models / f"m{i}" / "model.py")
        shutil.copy(world.weights, models / f"m{i}" / "weights.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out: dict = {"models": n_models, "max_rounds": max_rounds, "methods": ["nc"]}
    out["local"] = _audit(models, world.clean, work / "out-local", max_rounds, ["--local"], env)
    for nodes in (1, 2):
        with LoopbackCluster(nodes) as cluster:
            out[f"ray_{nodes}_node"] = _audit(models, world.clean, work / f"out-{nodes}", max_rounds,
                                              ["--address", cluster.address], dict(cluster.env, OMP_NUM_THREADS="1"))
    one, two, local = out["ray_1_node"], out["ray_2_node"], out["local"]
    out["speedup_2_over_1_node"] = round(two["audits_per_hour"] / one["audits_per_hour"], 3)
    per_model = (one["wall_s"] - local["wall_s"]) / n_models
    out["ray_overhead_s_per_model"] = round(per_model, 2)
    out["ray_overhead_share_of_one_audit"] = round(per_model / (local["rows_audit_s"] / n_models), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guard.bench.fleet_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="folder for the demo model, its copies and the reports")
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--max-rounds", type=int, default=40)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = measure(work, n_models=args.models, max_rounds=args.max_rounds)
    (work / "fleet_scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
