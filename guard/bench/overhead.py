"""Guard overhead in-process: guarded forward over bare forward, interleaved so both see the same
machine load, reported as the median and 95th-percentile ratio of per-call times."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def measure_overhead(model: nn.Module, guard, x: np.ndarray, *, batch_size: int = 1, repeats: int = 300,
                     warmup: int = 20) -> dict[str, float]:
    """Time ``model(x)`` (inference mode) and ``guard.run(x)`` alternately on the same batches.

    Returns medians and p95 of both (milliseconds) and their ratios. The guarded figure is the whole
    ``Guard.run``: validation, the tapped forward, every check, the policy and the result, inside a
    ``Guard.session()`` as the TorchServe handler runs it (the feature hook held for the worker's life;
    ``per_call_hook_p50_ratio`` is the same without the session: hook registered and removed per call).
    """
    n = len(x)
    batches = [np.ascontiguousarray(x[(i * batch_size) % n:(i * batch_size) % n + batch_size])
               for i in range(repeats)]
    batches = [b for b in batches if len(b) == batch_size] or [x[:batch_size]]
    tensors = [torch.from_numpy(b) for b in batches]

    def bare(i):
        with torch.inference_mode():
            model(tensors[i % len(tensors)])

    def guarded(i):
        guard.run(batches[i % len(batches)])

    def interleaved() -> tuple[np.ndarray, np.ndarray]:
        for i in range(warmup):
            bare(i)
            guarded(i)
        tb, tg = [], []
        for i in range(repeats):
            first, second = (bare, guarded) if i % 2 == 0 else (guarded, bare)
            t0 = time.perf_counter()
            first(i)
            t1 = time.perf_counter()
            second(i)
            t2 = time.perf_counter()
            (tb if first is bare else tg).append(t1 - t0)
            (tg if first is bare else tb).append(t2 - t1)
        return np.array(tb) * 1e3, np.array(tg) * 1e3

    b0, g0 = interleaved()  # hook registered and removed on every call
    per_call = float(np.median(g0) / np.median(b0))
    with guard.session():
        b, g = interleaved()
    return {"batch_size": batch_size, "bare_p50_ms": float(np.median(b)), "guarded_p50_ms": float(np.median(g)),
            "bare_p95_ms": float(np.percentile(b, 95)), "guarded_p95_ms": float(np.percentile(g, 95)),
            "p50_ratio": float(np.median(g) / np.median(b)),
            "p95_ratio": float(np.percentile(g, 95) / np.percentile(b, 95)),
            "per_call_hook_p50_ratio": per_call}


def median_us(seconds) -> float:
    """The median of durations in seconds, in microseconds (2 decimals)."""
    return round(float(np.median(seconds)) * 1e6, 2)


def median_call_us(fn, *, repeats: int, warmup: int) -> float:
    """Median microseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return median_us(ts)


def overhead_breakdown(guard, x: np.ndarray, *, repeats: int = 300) -> dict[str, float | bool]:
    """Where the guard's batch-1 time goes: median microseconds of each part of ``Guard.run``.

    ``bare_forward`` (the model alone), ``tapped_forward`` (with the feature hook and the copy to
    numpy), ``validate`` (input checks), ``check.NAME`` (each check's score alone, batch path),
    ``checks_batch_path`` (every check and the ensemble over a pooled Record), ``checks_compiled``
    (pooling, checks and ensemble in the one scorer call ``Guard.run`` makes for one input; compiled
    where ``compiled`` is true), ``run`` (everything: validation, tapped forward, checks, policy,
    result) and ``run_in_session`` (the same with the hook held, as the handler runs it).
    ``run_in_session - bare_forward`` is the guard's cost in serving.
    """
    from guard.inputs import validate_batch

    xb = np.ascontiguousarray(x[:1])
    xt = torch.from_numpy(xb)
    rec = guard._forward(xb)

    def median_us(fn) -> float:
        return median_call_us(fn, repeats=repeats, warmup=min(20, repeats))

    def bare():
        with torch.inference_mode():
            guard.model(xt)

    out = {"bare_forward": median_us(bare), "tapped_forward": median_us(lambda: guard._forward(xb)),
           "validate": median_us(lambda: validate_batch(xb, shape=guard.input_shape, what="input"))}
    for c in guard.checks:
        out[f"check.{c.name}"] = median_us(lambda c=c: c.score(rec))
    from guard import _numba

    out["checks_batch_path"] = median_us(lambda: guard.scores(rec))
    logits, features, inner = guard._tapped(xb)
    out["checks_compiled"] = median_us(lambda: guard._score_one(xb, logits, features, inner))
    out["compiled"] = _numba.available()
    out["run"] = median_us(lambda: guard.run(xb))
    with guard.session():
        out["run_in_session"] = median_us(lambda: guard.run(xb))
    return out


def net_performance(model: nn.Module, profile, x: np.ndarray, model_source: str, *, repeats: int = 200,
                    torchserve: dict | None = None) -> dict:
    """The serving cost of guarding one more network: batch-1 and batch-32 overhead, TorchServe throughput.

    ``profile`` is the network's own scan; ``model_source`` the text of its model file, which TorchServe
    loads as a user's would. ``torchserve`` holds :func:`guard.bench.serving.torchserve_throughput`'s
    keyword arguments (``None``: not measured). Returns ``guard_overhead_p50_ratio`` (batch 1),
    ``guard_overhead_batch32_ratio`` (p50, batch 32) and ``torchserve_throughput_ratio`` with their details.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from guard.online import Guard

    guard = Guard(model, profile, mode="enforce", verify=False)
    over = {f"batch_{b}": measure_overhead(model, guard, x, batch_size=b, repeats=repeats) for b in (1, 32)}
    out: dict = {"guard_overhead_p50_ratio": round(over["batch_1"]["p50_ratio"], 3),
                 "guard_overhead_batch32_ratio": round(over["batch_32"]["p50_ratio"], 3),
                 "torchserve_throughput_ratio": None, "overhead": over, "checks": list(guard.names)}
    if torchserve is None:
        out["torchserve"] = {"skipped": "TorchServe throughput not measured in this configuration"}
        return out
    from guard.bench.serving import torchserve_throughput

    work = Path(tempfile.mkdtemp(prefix="guard-bench-net-"))
    try:
        (work / "model.py").write_text(model_source)
        torch.save(model.state_dict(), work / "weights.pt")
        prof_dir = profile.save(work / "profile")
        ts = torchserve_throughput(work / "model.py", work / "weights.pt", prof_dir, x, work_dir=work / "ts",
                                   **torchserve)
    except Exception as e:  # noqa: BLE001 - a serving failure is a figure's reason, not the bench's end
        ts = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["torchserve"] = ts
    out["torchserve_throughput_ratio"] = ts.get("torchserve_throughput_ratio")
    return out
