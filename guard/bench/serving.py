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

Both go through the nginx ingress (``guard serve --ingress nginx``) when nginx is on PATH. Then the
guarded model is also measured through nginx and on TorchServe's own port, past the ingress, by the same
clients in alternating rounds at each of ``ingress_clients`` (4 and 16 threads):
``ingress_throughput_ratio`` (through nginx over direct, median of the per-round ratios, per client
count) is what the ingress costs.
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
from guard.torchserve.client import http
from guard.torchserve.supervision import Server

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
                status, _ = http(url, key=key, body=body, content_type="application/json", timeout=60)
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


def _ingress_cost(server: Server, key: str | None, bodies: list[bytes], *, requests: int, rounds: int,
                  clients: tuple[int, ...]) -> dict[str, Any]:
    """The guarded model through nginx and on TorchServe's own port, same clients, alternating rounds; per
    client count the median of the per-round throughput ratios (through nginx / direct)."""
    urls = {"via_ingress": f"{server.urls['inference']}/predictions/guarded",
            "direct": f"{server.upstream['inference']}/predictions/guarded"}
    out: dict[str, Any] = {"ratio": {}, "pairs": {}, "rounds": {}}
    for c in clients:
        _load(urls["direct"], key, bodies, requests=max(2, requests // 10), concurrency=c)  # warm at this load
        cell = _pair(urls, key, bodies, requests=requests, rounds=max(2, rounds), concurrency=c)
        out["ratio"][str(c)], out["pairs"][str(c)], out["rounds"][str(c)] = (cell["ratio"], cell["pair_ratios"],
                                                                             cell["rounds"])
    return out


def _pair(urls: dict[str, str], key: str | None, bodies: list[bytes], *, requests: int, rounds: int,
          concurrency: int) -> dict[str, Any]:
    """Two URLs at one load, ``rounds`` rounds with who goes first rotating: the median of the per-round throughput
    ratios of the first over the second (a round's two series saw the same machine load), each side's median
    requests/s (``rps_median``) and the rounds."""
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in urls}
    names = list(urls)
    for r in range(rounds):
        for m in names[r % len(names):] + names[:r % len(names)]:
            runs[m].append(_load(urls[m], key, bodies, requests=requests, concurrency=concurrency))
    top, bottom = names
    pairs = [a["rps"] / b["rps"] for a, b in zip(runs[top], runs[bottom]) if b["rps"] > 0]
    return {"ratio": round(float(np.median(pairs)), 3) if pairs else None, "pair_ratios": [round(v, 3) for v in pairs],
            "rps_median": {m: round(float(np.median([v["rps"] for v in runs[m]])), 2) for m in names},
            "rounds": runs}


def torchserve_throughput(model_file: Path, weights: Path, profile_dir: Path, x: np.ndarray, *,
                          requests: int = 100, rounds: int = 3, concurrency: int = 4, batch_size: int = 1,
                          max_batch_delay: int = 5, work_dir: Path | None = None,
                          start_timeout: float = 300.0, threads: int | None = None, ingress: str | None = None,
                          ingress_clients: tuple[int, ...] = (4, 16), grid_clients: tuple[int, ...] = (),
                          grid_batch_sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    """Guarded over baseline TorchServe throughput for the model; ``x`` supplies the request images.

    The headline figure (``torchserve_throughput_ratio``) is at ``batch_size`` and ``concurrency``. With
    ``grid_clients`` and ``grid_batch_sizes`` the same ratio is measured for every client count and archive batch
    size given (TorchServe's dynamic batching: ``batchSize`` and ``maxBatchDelay`` ``max_batch_delay`` ms), on
    TorchServe's own port and, with the ingress, through nginx: ``grid`` holds one entry per (route, batch size,
    clients), each ``requests`` requests per client thread.

    ``ingress``: ``"nginx"`` (the default when nginx is on PATH) or ``"none"``; with nginx, the ingress's cost
    at each of ``ingress_clients`` concurrent clients is measured too.

    ``threads`` sets ``OMP_NUM_THREADS`` for TorchServe's workers (both models alike); TorchServe
    leaves torch at one thread per core, whose spinning made single requests many times slower on a
    machine shared with other work (figures: docs/benchmarks.md, 'Measurements behind the defaults').
    """
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="guard-bench-ts-")) if own_tmp else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "model-store"
    common = dict(model_file=model_file, weights=weights, profile=profile_dir, export_path=store,
                  max_batch_delay=max_batch_delay, workers=1, mode="enforce", force=True)
    server = None
    ingress = ingress or ("nginx" if shutil.which("nginx") else "none")
    sizes = sorted({int(batch_size), *map(int, grid_batch_sizes)})
    names = {b: ("guarded", "baseline") if b == batch_size else (f"guarded_b{b}", f"baseline_b{b}") for b in sizes}
    try:
        for b, (g, base) in names.items():
            make_archive(name=g, batch_size=b, **common)
            make_archive(name=base, handler=BASELINE_HANDLER, batch_size=b, **common)
        bodies = [json.dumps({"instances": [np.round(x[i], 4).tolist()]}).encode() for i in range(min(len(x), 32))]
        t0 = time.perf_counter()
        saved = os.environ.get("OMP_NUM_THREADS")
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(int(threads))  # ts.start copies os.environ for TorchServe
        try:
            server = ts.start(store, models={m: f"{m}.mar" for pair in names.values() for m in pair},
                              run_dir=work / "run", token_auth=True, timeout=start_timeout, ingress=ingress)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        start_seconds = time.perf_counter() - t0
        key = server.key("inference")
        bases = {"via_ingress" if ingress == "nginx" else "direct": server.urls["inference"]}
        if ingress == "nginx":
            bases["direct"] = server.upstream["inference"]

        def urls(route: str, b: int) -> dict[str, str]:
            return {side: f"{bases[route]}/predictions/{m}" for side, m in zip(("guarded", "baseline"), names[b])}

        first = next(iter(bases))
        for b in sizes:  # warm every worker
            for u in urls(first, b).values():
                _load(u, key, bodies, requests=max(2, requests // 10), concurrency=concurrency)
        head = _pair(urls(first, batch_size), key, bodies, requests=requests, rounds=rounds, concurrency=concurrency)
        grid = []
        for route in bases if grid_clients else ():
            for b in sizes:
                for c in grid_clients:
                    cell = (head if (route, b, c) == (first, batch_size, concurrency) else
                            _pair(urls(route, b), key, bodies, requests=requests, rounds=rounds, concurrency=c))
                    grid.append({"route": route, "batch_size": b, "clients": c, "ratio": cell["ratio"],
                                 "pair_ratios": cell["pair_ratios"],
                                 "guarded_rps_median": cell["rps_median"]["guarded"],
                                 "baseline_rps_median": cell["rps_median"]["baseline"]})
        ingress_cost = (_ingress_cost(server, key, bodies, requests=requests, rounds=rounds, clients=ingress_clients)
                        if ingress == "nginx" else {})
        return {"torchserve_throughput_ratio": head["ratio"], "pair_ratios": head["pair_ratios"],
                "ingress_throughput_ratio": ingress_cost.get("ratio"),
                "ingress_pair_ratios": ingress_cost.get("pairs"), "ingress_rounds": ingress_cost.get("rounds"),
                "guarded_rps_median": head["rps_median"]["guarded"],
                "baseline_rps_median": head["rps_median"]["baseline"],
                "rounds": head["rounds"], "grid": grid,
                "config": {"requests_per_thread": requests, "concurrency": concurrency, "rounds": rounds,
                           "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay, "workers": 1,
                           "worker_omp_threads": threads, "grid_clients": list(grid_clients),
                           "grid_batch_sizes": sizes if grid_clients else [],
                           "token_auth": True, "ingress": ingress, "ingress_clients": list(ingress_clients),
                           "route": first, "body": "JSON, one 3x32x32 instance"},
                "start_seconds": round(start_seconds, 1)}
    finally:
        if server is not None:
            server.stop()
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
