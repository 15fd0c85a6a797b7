"""Where a served request's time goes in the worker: each stage of the guarded and of the baseline handler's
path for one single-instance JSON request, timed in the order the handler runs them.

The stages are the handler's own calls (:class:`~guard.serving.service.GuardService` and
:class:`~guard.serving.service.BaselineService`): ``decode`` (the parsed JSON body, as TorchServe hands it
for ``application/json``, to a validated batch), ``forward`` (the bare model), ``hooks`` (the tapped forward
less the bare one: the feature, inner-layer and token hooks and their copies), ``validate`` (the guard's
input check), ``scoring`` (the compiled checks and the ensemble), ``policy`` (verdicts, reasons and the
answer dictionaries), ``metrics`` (counting the answer into the worker's batched sink), ``audit`` (one audit
line; only refused, repaired or flagged instances write one, so it is timed on a triggered input) and
``encode`` (the reply body to JSON, as TorchServe sends it). ``whole`` is the service's ``handle`` plus the
encoding, timed alone, so that ``stages_sum`` can be checked against it. TorchServe's own work (the frontend, the
worker's protocol, parsing the JSON text) is the same for both handlers and is not here; the worker
profile in docs/benchmarks.md ('Serving cost') has it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from guard.bench.overhead import median_call_us, median_us
from guard.online import Guard
from guard.online.engine import bare_predictions
from guard.serving.metrics import BatchedSink, NullSink, count_decisions
from guard.serving.service import BaselineService, GuardService, Request
from guard.serving.trail import AuditLog

JSON = "application/json"


def _stages(steps: list[tuple[str, Callable[[], object]]], repeats: int, warmup: int) -> dict[str, float]:
    """Run ``steps`` in order ``repeats`` times; the median microseconds of each (a repeated name: the median of
    its first occurrence)."""
    times: dict[str, list[float]] = {}
    for i in range(warmup + repeats):
        per: dict[str, float] = {}
        for name, fn in steps:
            t0 = time.perf_counter()
            fn()
            per.setdefault(name, time.perf_counter() - t0)
        if i >= warmup:
            for name, v in per.items():
                times.setdefault(name, []).append(v)
    return {name: median_us(v) for name, v in times.items()}


def serving_breakdown(guard: Guard, clean: np.ndarray, triggered: np.ndarray | None = None, *,
                      repeats: int = 300, warmup: int = 30) -> dict[str, dict[str, float]]:
    """Median microseconds per stage of one single-instance request, guarded and baseline (see the module).

    ``guard`` is held in a session (its hooks registered once, as in a worker); ``clean`` supplies the requests
    (one image each, cycled), ``triggered`` one image the guard refuses for the audit line (no ``audit`` stage
    without it). Returns ``{"guarded": {stage: us, ..., "whole": us}, "baseline": {...}}``.
    """
    bodies = [json.loads(json.dumps({"instances": np.round(clean[i:i + 1], 4).tolist()}))
              for i in range(min(len(clean), 16))]
    service = GuardService(guard, sink=BatchedSink(NullSink()))
    baseline = BaselineService(guard.model, guard.input_shape)
    state: dict = {"i": 0}
    model = guard.model

    def request() -> Request:
        state["i"] += 1
        return Request(bodies[state["i"] % len(bodies)], content_type=JSON)

    def decode():
        state["x"] = service.decode(request()).x

    def forward():
        with torch.inference_mode():
            model(torch.from_numpy(state["x"]))

    def tapped():
        state["tap"] = guard._tapped(state["x"])

    def run():
        state["result"] = guard.run(state["x"])

    def answers():
        state["decisions"] = state["result"].decisions
        state["answers"] = [d.to_dict() for d in state["decisions"]]

    def metrics():
        count_decisions(service.sink, state["decisions"])
        service.sink.latency(1e-4)
        service.sink.flush()

    def encode():
        json.dumps({"predictions": state["answers"]})

    with guard.session():
        staged = _stages([("decode", decode), ("run", run), ("answers", answers), ("metrics", metrics),
                          ("encode", encode)], repeats, warmup)
        del staged["run"]
        runs = []  # Guard.run's own split of each call, in the same sequence
        for _ in range(repeats):
            decode()
            run()
            runs.append(state["result"].stages_ms)
        for stage in ("validate", "forward", "scoring", "policy"):
            staged[f"run.{stage}"] = median_us([r[stage] / 1e3 for r in runs])
        # what the hooks add: the bare and the tapped forward in the same place (after a decode), alternately
        both = _stages([("decode", decode), ("bare", forward), ("decode", decode), ("hooked", tapped)], repeats,
                       warmup)
        staged["hooks"] = round(both["hooked"] - both["bare"], 2)
        staged["bare_forward"] = both["bare"]
        if triggered is not None and len(triggered):
            with tempfile.TemporaryDirectory(prefix="guard-breakdown-") as tmp:
                audit = AuditLog(Path(tmp, "audit.log"), model="bench", model_sha256="0" * 64, mode="enforce")
                xt = np.ascontiguousarray(triggered[:1], dtype=np.float32)
                (refused,) = [d.to_dict() for d in guard.run(xt).decisions]
                staged["audit_per_refused_instance"] = median_call_us(
                    lambda: audit.write(request_id="r", instance=0, status=403, decision=refused, payload=xt[0]),
                    repeats=repeats, warmup=warmup)
                audit.close()
        staged["stages_sum"] = round(sum(v for k, v in staged.items()
                                         if k not in ("audit_per_refused_instance", "hooks", "bare_forward")), 2)
        staged["whole"] = median_call_us(lambda: json.dumps(service.handle([request()])[0].body), repeats=repeats,
                                         warmup=warmup)
    out: dict[str, dict[str, float]] = {"guarded": staged}

    def bare():
        state["bare"] = [{"label": label, "probabilities": p} for label, p in bare_predictions(model, state["x"])]

    base = _stages([("decode", decode), ("forward_and_answer", bare),
                    ("encode", lambda: json.dumps({"predictions": state["bare"]}))], repeats, warmup)
    base["stages_sum"] = round(sum(base.values()), 2)
    base["whole"] = median_call_us(lambda: json.dumps(baseline.handle([request()])[0].body), repeats=repeats,
                                   warmup=warmup)
    out["baseline"] = base
    return out


__all__ = ["serving_breakdown"]
