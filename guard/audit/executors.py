"""Where a fleet audit's models run: :class:`RayExecutor` (one Ray task per model, a local Ray instance by
default or an existing cluster) or :class:`LocalExecutor` (this process, one model after another).

Both take the models' :class:`~guard.audit.fleet.Payload` and yield one row per model as its audit ends
(:func:`guard.audit.fleet.audit_payload` builds the rows; a model's own failure is already a row there).
What only an executor sees, a worker lost mid-audit, is Ray's to retry (``max_retries``); a model that
loses its worker every time, or runs past ``timeout_s``, gets an error row and the others go on.
Ray is imported only here and only when a :class:`RayExecutor` starts, so guard runs without it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from guard.audit.fleet import AuditOptions, Payload, audit_payload, error_row, iterate
from guard.errors import InputError


class LocalExecutor:
    """Every model's audit in this process, in turn: no cluster, nothing to set up, no parallelism."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "nodes": 1, "slots": 1}

    def run(self, payloads: Iterable[Payload], x: np.ndarray | None, y: np.ndarray | None,
            options: AuditOptions) -> Iterator[dict[str, Any]]:
        yield from iterate(payloads, x, y, options)


def _ray_audit(p: Payload, data: tuple, options: AuditOptions) -> dict[str, Any]:
    """The task a Ray worker runs: one model's audit (module-level, so workers import it from guard)."""
    x, y = data
    return audit_payload(p, x, y, options)


class RayExecutor:
    """One Ray task per model, each asking for ``cpus_per_model`` CPUs (its audit's torch threads) and
    ``gpus_per_model`` GPUs.

    ``address`` None starts a local Ray instance with ``num_cpus`` (default: this machine's) and stops it
    on exit; otherwise it connects to that cluster (``auto``, or ``HOST:PORT`` of its head) and leaves it
    running. At most as many tasks are in flight as the cluster has slots, so the driver holds only those
    models' files at once and ``timeout_s`` (per model) counts from a task's submission, close to its
    start (the slots are re-read every few seconds, so a cluster that lost a node gets fewer tasks). A task
    whose worker dies is resubmitted up to ``max_retries`` times by Ray; its model's row then
    comes once, from the attempt that finished.
    """

    def __init__(self, *, address: str | None = None, num_cpus: int | None = None, cpus_per_model: float = 1.0,
                 gpus_per_model: float = 0.0, max_retries: int = 3, timeout_s: float | None = None):
        if cpus_per_model <= 0 or gpus_per_model < 0 or max_retries < 0:
            raise InputError("--cpus-per-model must be > 0, --gpus-per-model and --max-retries >= 0")
        if timeout_s is not None and timeout_s <= 0:
            raise InputError(f"--timeout must be > 0 seconds, got {timeout_s:g}")
        self.address = address
        self.num_cpus = num_cpus
        self.cpus_per_model = float(cpus_per_model)
        self.gpus_per_model = float(gpus_per_model)
        self.max_retries = int(max_retries)
        self.timeout_s = timeout_s
        self._started = False
        self._ray = None

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise InputError("auditing many models runs on Ray, which is not installed: pip install 'guard[cluster]' "
                             "(or pass --local to audit them one by one in this process)") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": "WARNING"}
            if self.address is None:
                kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise InputError(f"cannot start or reach {where}: {str(e).splitlines()[0] if str(e) else e!r}"
                                 ) from None
            self._started = True
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _slots(self) -> int:
        res = self._ray.cluster_resources()
        slots = int(res.get("CPU", 1) // self.cpus_per_model)
        if self.gpus_per_model > 0:
            slots = min(slots, int(res.get("GPU", 0) // self.gpus_per_model))
        if slots < 1:
            raise InputError(f"the Ray cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs: "
                             f"no room for one audit at {self.cpus_per_model:g} CPUs and {self.gpus_per_model:g} GPUs")
        return slots

    def _capacity(self) -> int:
        """The slots now, at least one (a cluster that lost every node still runs what Ray can place later)."""
        try:
            return self._slots()
        except InputError:
            return 1

    def describe(self) -> dict[str, Any]:
        ray = self._ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return {"kind": "ray", "address": self.address or "local", "nodes": len(nodes), "slots": self._slots(),
                "cpus_per_model": self.cpus_per_model, "gpus_per_model": self.gpus_per_model,
                "max_retries": self.max_retries, "timeout_s": self.timeout_s, "ray": ray.__version__}

    def run(self, payloads: Iterable[Payload], x: np.ndarray | None, y: np.ndarray | None,
            options: AuditOptions) -> Iterator[dict[str, Any]]:
        ray = self._ray
        from ray.exceptions import GetTimeoutError, RayError, TaskCancelledError

        options = AuditOptions(options.methods, options.seed, max(1, int(self.cpus_per_model)), options.max_rounds,
                               "cuda" if self.gpus_per_model > 0 else "cpu")  # Ray sets the task's CUDA_VISIBLE_DEVICES
        task = ray.remote(_ray_audit).options(num_cpus=self.cpus_per_model, num_gpus=self.gpus_per_model,
                                              max_retries=self.max_retries, retry_exceptions=False)
        data = ray.put((x, y))
        capacity = {"slots": self._slots(), "at": time.monotonic()}
        todo = iter(payloads)
        pending: dict[Any, tuple[str, float]] = {}  # ref -> (model name, submitted at)

        def submit() -> None:
            # the cluster's slots, re-read every 5 s: after a node is lost, no more tasks than the rest can run
            # wait in Ray's queue, where --timeout's clock (from submission) would run while they wait
            if time.monotonic() - capacity["at"] > 5:
                capacity.update(slots=self._capacity(), at=time.monotonic())
            while len(pending) < capacity["slots"]:
                p = next(todo, None)
                if p is None:
                    return
                pending[task.remote(p, data, options)] = (p.name, time.monotonic())

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                name, t0 = pending.pop(ref)
                try:
                    yield ray.get(ref, timeout=60)
                except (RayError, GetTimeoutError) as e:  # the worker died on every attempt, or was cancelled
                    cancelled = isinstance(e, TaskCancelledError)
                    why = (f"timed out after {self.timeout_s:g} s" if cancelled else
                           f"its worker was lost on each of {self.max_retries + 1} attempts ({type(e).__name__})")
                    yield error_row(name, f"the audit did not finish: {why}", seconds=time.monotonic() - t0)
            if self.timeout_s is not None:
                now = time.monotonic()
                for ref, (_, t0) in list(pending.items()):
                    if now - t0 > self.timeout_s:
                        ray.cancel(ref, force=True, recursive=True)
            submit()
