"""TorchServe throughput: the guarded handler against the unguarded baseline handler, same model and config.

Both archives are built by ``guard archive``'s own :func:`make_archive` from the same model file,
weights and profile with the same TorchServe settings (workers, batch size, batch delay, request
bound); only the handler differs (``handlers/guarded_handler.py`` vs ``handlers/baseline_handler.py``,
which decodes requests the same way and skips the guard). One TorchServe serves both on loopback with
token authorization on, as deployed. The load is bounded: ``concurrency`` client threads each send
``requests`` single-instance JSON requests per round; rounds alternate between the two models (and
which goes first), so both see the same machine load; the ratio is the median over the pairs of
adjacent rounds of guarded over baseline throughput (robust to load that drifts between pairs).
TorchServe is started in its own process group and stopped in ``finally``.

Both go through guard's gateway, as ``guard serve`` deploys them. A third series sends the guarded
model's requests to TorchServe's private port, past the gateway, in the same rounds:
``gateway_throughput_ratio`` (through the gateway over direct) is what the gateway costs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from guard.torchserve import server as ts
from guard.torchserve.archive import make_archive

BASELINE_HANDLER = ts.BASELINE_HANDLER


def _load(url: str, key: str | None, bodies: list[bytes], *, requests: int, concurrency: int) -> dict[str, Any]:
    """``concurrency`` threads, ``requests`` requests each; wall time, status counts, latencies."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(tid: int) -> None:
        mine_s: dict[int, int] = {}
        mine_l = []
        for i in range(requests):
            body = bodies[(tid * requests + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                status, _ = ts.http(url, key=key, body=body, content_type="application/json", timeout=60)
            except OSError:
                status = -1
            mine_l.append(time.perf_counter() - t0)
            mine_s[status] = mine_s.get(status, 0) + 1
        with lock:
            for k, v in mine_s.items():
                statuses[k] = statuses.get(k, 0) + v
            latencies.extend(mine_l)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - t0
    n = requests * concurrency
    answered = sum(v for k, v in statuses.items() if k in (200, 403))
    lat = np.array(latencies) * 1e3
    return {"requests": n, "answered": answered, "seconds": round(wall, 3), "rps": round(answered / wall, 2),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "latency_p50_ms": round(float(np.median(lat)), 2),
            "latency_p95_ms": round(float(np.percentile(lat, 95)), 2)}


def torchserve_throughput(model_file: Path, weights: Path, profile_dir: Path, x: np.ndarray, *,
                          requests: int = 100, rounds: int = 3, concurrency: int = 4, batch_size: int = 1,
                          max_batch_delay: int = 5, work_dir: Path | None = None,
                          start_timeout: float = 300.0, threads: int | None = None) -> dict[str, Any]:
    """Guarded over baseline TorchServe throughput for the model; ``x`` supplies the request images.

    ``threads`` sets ``OMP_NUM_THREADS`` for TorchServe's workers (both models alike); TorchServe
    leaves torch at one thread per core, whose spinning made single requests 10x slower on a
    machine shared with other work.
    """
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="guard-bench-ts-")) if own_tmp else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "model-store"
    common = dict(model_file=model_file, weights=weights, profile=profile_dir, export_path=store,
                  batch_size=batch_size, max_batch_delay=max_batch_delay, workers=1, mode="enforce", force=True)
    server = None
    try:
        make_archive(name="guarded", **common)
        make_archive(name="baseline", handler=BASELINE_HANDLER, **common)
        bodies = [json.dumps({"instances": [np.round(x[i], 4).tolist()]}).encode() for i in range(min(len(x), 32))]
        t0 = time.perf_counter()
        saved = os.environ.get("OMP_NUM_THREADS")
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(int(threads))  # ts.start copies os.environ for TorchServe
        try:
            server = ts.start(store, models={"guarded": "guarded.mar", "baseline": "baseline.mar"},
                              run_dir=work / "run", token_auth=True, timeout=start_timeout)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        start_seconds = time.perf_counter() - t0
        key = server.key("inference")
        urls = {m: f"{server.urls['inference']}/predictions/{m}" for m in ("guarded", "baseline")}
        if server.gateway:
            urls["guarded_direct"] = f"{server.upstream['inference']}/predictions/guarded"
        for m in ("guarded", "baseline"):  # warm both workers
            _load(urls[m], key, bodies, requests=max(2, requests // 10), concurrency=concurrency)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in urls}
        names = list(urls)
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for m in order:
                runs[m].append(_load(urls[m], key, bodies, requests=requests, concurrency=concurrency))
        med = {m: float(np.median([v["rps"] for v in runs[m]])) for m in runs}
        # one ratio per round (the series of a round saw the same machine load), then their median
        pairs = [g["rps"] / b["rps"] for g, b in zip(runs["guarded"], runs["baseline"]) if b["rps"] > 0]
        ratio = float(np.median(pairs)) if pairs else float("nan")
        via = [g["rps"] / d["rps"] for g, d in zip(runs["guarded"], runs.get("guarded_direct", [])) if d["rps"] > 0]
        return {"torchserve_throughput_ratio": round(ratio, 3), "pair_ratios": [round(v, 3) for v in pairs],
                "gateway_throughput_ratio": round(float(np.median(via)), 3) if via else None,
                "gateway_pair_ratios": [round(v, 3) for v in via],
                "guarded_rps_median": round(med["guarded"], 2),
                "baseline_rps_median": round(med["baseline"], 2), "rounds": runs,
                "config": {"requests_per_thread": requests, "concurrency": concurrency, "rounds": rounds,
                           "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay, "workers": 1,
                           "worker_omp_threads": threads,
                           "token_auth": True, "gateway": server.gateway, "body": "JSON, one 3x32x32 instance"},
                "start_seconds": round(start_seconds, 1)}
    finally:
        if server is not None:
            server.stop()
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
