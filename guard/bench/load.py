"""A bounded HTTP load driver for a guarded (or baseline) TorchServe endpoint on loopback.

Why its own driver: the hardening promises are about *every* request under concurrency (no 5xx, no
answer without the guard's fields, every request accounted for in the responses and in the
``guard_requests_total`` counter), so the driver keeps one record per request (kind, status, latency,
parsed body), not just a throughput figure. ``guard bench`` and tests/integration/test_load.py use it.

Bounded by construction: at most ``total`` requests and ``duration_s`` seconds (whichever comes
first), ``concurrency`` threads with one keep-alive connection each, a per-request socket timeout, and
a bounded join. Only 127.0.0.1/localhost URLs are accepted.

Typical use::

    mix = standard_mix(clean, triggered, max_request_bytes=1 << 20)
    report = run_load(url, mix, key=inference_key, concurrency=16, total=800, duration_s=60)
    print(report.summary()); report.write_json(path)
"""

from __future__ import annotations

import http.client
import io
import json
import re
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GUARD_FIELDS = frozenset({"label", "probabilities", "verdict", "reasons", "scores"})
VERDICTS = frozenset({"pass", "rejected", "repaired", "flagged", "error"})
CONNECTION_ERROR = -1  # status recorded when no HTTP answer came back (reset, refused, timeout)


@dataclass(frozen=True)
class LoadRequest:
    """One request of the mix: ``kind`` labels it in the report, ``expect`` lists the statuses it should get."""

    kind: str
    body: bytes
    content_type: str | None = "application/json"
    expect: tuple[int, ...] = (200,)


@dataclass
class Outcome:
    """What one sent request got: status (``-1`` for no HTTP answer), latency, parsed JSON body."""

    index: int
    kind: str
    status: int
    latency_s: float
    sent_at_s: float  # seconds since the run started
    body: Any = None
    request_id: str | None = None
    error: str | None = None

    @property
    def guarded(self) -> bool:
        """True for a 200/403 whose every prediction carries the guard's fields and a known verdict."""
        preds = self.body.get("predictions") if isinstance(self.body, dict) else None
        return bool(preds) and all(isinstance(p, dict) and GUARD_FIELDS <= set(p) and p.get("verdict") in VERDICTS
                                   for p in preds)

    @property
    def verdicts(self) -> list[str]:
        preds = self.body.get("predictions") if isinstance(self.body, dict) else None
        return [str(p.get("verdict")) for p in preds or [] if isinstance(p, dict)]


def _percentiles(seconds: Sequence[float]) -> dict[str, float | None]:
    if not len(seconds):
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


@dataclass
class LoadReport:
    """Every outcome of a run plus the figures derived from them."""

    url: str
    concurrency: int
    wall_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    stopped_by: str = "count"  # "count" | "time"
    started_monotonic: float = 0.0  # time.monotonic() at the start; Outcome.sent_at_s is relative to it

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    def by_status(self) -> dict[int, int]:
        return dict(sorted(Counter(o.status for o in self.outcomes).items()))

    def by_kind(self) -> dict[str, dict[int, int]]:
        out: dict[str, Counter[int]] = {}
        for o in self.outcomes:
            out.setdefault(o.kind, Counter())[o.status] += 1
        return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}

    def server_errors(self) -> list[Outcome]:
        """Outcomes with a 5xx status or no HTTP answer at all."""
        return [o for o in self.outcomes if o.status >= 500 or o.status == CONNECTION_ERROR]

    def unguarded(self) -> list[Outcome]:
        """200/403 answers without the guard's fields on every prediction (must be empty when guarded)."""
        return [o for o in self.outcomes if o.status in (200, 403) and not o.guarded]

    def unexpected(self, expectations: dict[str, tuple[int, ...]]) -> list[Outcome]:
        """Outcomes whose status is not among their kind's expected statuses."""
        return [o for o in self.outcomes if o.kind in expectations and o.status not in expectations[o.kind]]

    def verdict_counts(self) -> dict[str, int]:
        """What the metrics should show: one per answered instance by verdict, one ``error`` per 400/413."""
        c: Counter[str] = Counter()
        for o in self.outcomes:
            if o.status in (200, 403):
                c.update(o.verdicts)
            elif o.status in (400, 413) and isinstance(o.body, dict) and "error" in o.body:
                c["error"] += 1
        return dict(sorted(c.items()))

    def latency(self, kind: str | None = None, statuses: Sequence[int] | None = None) -> dict[str, float | None]:
        sel = [o.latency_s for o in self.outcomes if (kind is None or o.kind == kind)
               and (statuses is None or o.status in statuses)]
        return _percentiles(sel)

    def to_dict(self) -> dict[str, Any]:
        answered = [o for o in self.outcomes if o.status != CONNECTION_ERROR]
        return {
            "url": self.url, "concurrency": self.concurrency, "sent": self.sent, "wall_s": round(self.wall_s, 3),
            "stopped_by": self.stopped_by,
            "requests_per_s": round(len(answered) / self.wall_s, 2) if self.wall_s > 0 else None,
            "by_status": {str(k): v for k, v in self.by_status().items()},
            "by_kind": {k: {str(s): n for s, n in v.items()} for k, v in self.by_kind().items()},
            "latency_all": self.latency(),
            "latency_by_kind": {k: self.latency(k) for k in sorted({o.kind for o in self.outcomes})},
            "server_errors": len(self.server_errors()), "unguarded_answers": len(self.unguarded()),
            "verdicts": self.verdict_counts(),
        }

    def summary(self) -> str:
        d = self.to_dict()
        lat = d["latency_all"]
        return (f"{d['sent']} requests in {d['wall_s']} s ({d['requests_per_s']}/s, concurrency {self.concurrency}); "
                f"status {d['by_status']}; latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms; "
                f"5xx/no answer {d['server_errors']}; unguarded {d['unguarded_answers']}")

    def write_json(self, path: str | Path, **extra: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")
        return path


def combine(reports: Sequence[LoadReport]) -> LoadReport:
    """Several runs against one endpoint as one report (outcomes re-indexed in order, wall times added).

    Alternating short runs of two endpoints (A, B, B, A) and combining each side's runs lets both
    see the same machine load, which matters on a shared machine.
    """
    if not reports:
        raise ValueError("no reports to combine")
    outcomes, offset = [], 0
    for r in reports:
        for o in r.outcomes:
            outcomes.append(Outcome(offset + o.index, o.kind, o.status, o.latency_s, o.sent_at_s, o.body,
                                    o.request_id, o.error))
        offset += r.sent
    stopped = "time" if any(r.stopped_by == "time" for r in reports) else "count"
    return LoadReport(url=reports[0].url, concurrency=reports[0].concurrency, wall_s=sum(r.wall_s for r in reports),
                      outcomes=outcomes, stopped_by=stopped, started_monotonic=reports[0].started_monotonic)


def _target(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the load driver only sends to http://127.0.0.1: {url}")
    return parts.hostname, parts.port or 80, parts.path or "/"


def post_once(url: str, body: bytes, *, content_type: str | None = "application/json", key: str | None = None,
              timeout_s: float = 30.0) -> tuple[int, bytes, str | None]:
    """One POST with exactly these headers (unlike urllib, no implicit form Content-Type).

    Returns ``(status, body, error)``; ``status`` is ``-1`` and ``error`` says why when no HTTP answer
    came back (a server may answer and close while a large body is still being sent).
    """
    host, port, path = _target(url)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        try:
            conn.request("POST", path, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may already have answered: read it below
        resp = conn.getresponse()
        return resp.status, resp.read(), None
    except (OSError, http.client.HTTPException) as e:
        return CONNECTION_ERROR, b"", f"{type(e).__name__}: {e}"[:200]
    finally:
        conn.close()


def run_load(url: str, requests: Sequence[LoadRequest], *, key: str | None = None, concurrency: int = 16,
             total: int = 1000, duration_s: float = 60.0, timeout_s: float = 30.0,
             on_progress: Callable[[int], None] | None = None) -> LoadReport:
    """Send ``requests`` round-robin from ``concurrency`` threads until ``total`` are sent or ``duration_s`` passes.

    ``key`` is TorchServe's inference key (sent as ``Authorization: Bearer``). Each thread keeps one
    keep-alive connection and reopens it after a close or an error. ``on_progress(n_sent)`` is called
    from the sending threads (keep it cheap): the fault test uses it to kill a worker mid-load.
    """
    if not requests:
        raise ValueError("no requests to send")
    if concurrency < 1 or total < 1 or duration_s <= 0:
        raise ValueError("concurrency, total and duration_s must be positive")
    host, port, path = _target(url)
    lock = threading.Lock()
    next_index = [0]
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    deadline = t0 + duration_s
    stopped = ["count"]

    def claim() -> int | None:
        with lock:
            if next_index[0] >= total:
                return None
            if time.monotonic() >= deadline:
                stopped[0] = "time"
                return None
            i = next_index[0]
            next_index[0] += 1
            return i

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        mine: list[Outcome] = []
        try:
            while (i := claim()) is not None:
                req = requests[i % len(requests)]
                headers = {"Content-Type": req.content_type} if req.content_type else {}
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                sent_at = time.monotonic()
                status, body, rid, err = CONNECTION_ERROR, None, None, None
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
                    conn.request("POST", path, body=req.body, headers=headers)
                    resp = conn.getresponse()
                    raw = resp.read()
                    status, rid = resp.status, resp.getheader("x-request-id")
                    try:
                        body = json.loads(raw) if raw else None
                    except ValueError:
                        body = raw[:200].decode("utf-8", "replace")
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException) as e:
                    err = f"{type(e).__name__}: {e}"[:200]
                    if conn is not None:
                        conn.close()
                    conn = None
                done = time.monotonic()
                mine.append(Outcome(i, req.kind, status, done - sent_at, sent_at - t0, body, rid, err))
                if on_progress is not None:
                    on_progress(i + 1)
        finally:
            if conn is not None:
                conn.close()
            with lock:
                outcomes.extend(mine)

    threads = [threading.Thread(target=worker, name=f"load-{n}", daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    join_deadline = deadline + timeout_s + 5
    for t in threads:
        t.join(timeout=max(0.1, join_deadline - time.monotonic()))
    wall = time.monotonic() - t0
    with lock:
        done = sorted(outcomes, key=lambda o: o.index)
    return LoadReport(url=url, concurrency=concurrency, wall_s=wall, outcomes=done, stopped_by=stopped[0],
                      started_monotonic=t0)


# ---------------------------------------------------------------- request mixes


def json_body(x: np.ndarray, decimals: int = 4) -> bytes:
    """``{"instances": [...]}`` of a batch ``(N, C, H, W)``, values rounded (smaller bodies)."""
    return json.dumps({"instances": np.round(np.asarray(x, dtype=np.float64), decimals).tolist()}).encode()


def png_body(x_chw: np.ndarray) -> bytes:
    """One ``(C, H, W)`` image in [0, 1] as PNG bytes."""
    from PIL import Image

    u8 = np.rint(np.clip(x_chw, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(u8[0] if u8.shape[0] == 1 else u8.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def malformed_requests(shape: tuple[int, int, int], max_request_bytes: int) -> list[LoadRequest]:
    """A fixed set of bad requests every guarded endpoint must answer 400 or 413 (with a JSON error)."""
    c, h, w = shape
    ok = np.full((1, c, h, w), 0.5)
    text = json.dumps({"instances": ok.tolist()})
    bad = [
        LoadRequest("malformed", b"", "application/json", (400,)),
        LoadRequest("malformed", b"{\"instances\": [[", "application/json", (400,)),
        LoadRequest("malformed", bytes(range(256)) * 4, "application/octet-stream", (400,)),
        LoadRequest("malformed", json.dumps({"instances": np.full((1, c, h, w + 1), 0.5).tolist()}).encode(),
                    "application/json", (400,)),
        LoadRequest("malformed", json.dumps({"instances": ok[0].tolist()}).encode(), "application/json", (400,)),
        LoadRequest("malformed", text.replace("0.5", "NaN", 1).encode(), "application/json", (400,)),
        LoadRequest("malformed", json.dumps({"instances": (ok * 3).tolist()}).encode(), "application/json", (400,)),
        LoadRequest("malformed", text.encode(), "image/png", (400,)),
        LoadRequest("malformed", b"<xml/>", "application/xml", (400,)),
        LoadRequest("malformed", png_body(np.zeros((c if c in (1, 3) else 3, h + 1, w), np.float32)), "image/png",
                    (400,)),
        LoadRequest("oversized", b'{"instances": ' + b" " * (max_request_bytes + 1) + b"[]}", "application/json",
                    (413,)),
    ]
    return bad


def standard_mix(clean: np.ndarray, triggered: np.ndarray, *, max_request_bytes: int,
                 malformed: bool = True) -> list[LoadRequest]:
    """Interleaved clean (JSON and PNG, expect 200), triggered (expect 403) and malformed (400/413) requests.

    ``clean`` should be inputs the guard passes and ``triggered`` ones it rejects (single instances, so a
    rejection is a 403); about half the mix is clean, a quarter triggered, a quarter malformed.
    """
    shape = tuple(int(s) for s in clean.shape[1:])
    good = [LoadRequest("clean", json_body(x[None]), "application/json", (200,)) for x in clean]
    good += [LoadRequest("clean", png_body(x), "image/png", (200,)) for x in clean[: max(1, len(clean) // 4)]]
    trig = [LoadRequest("triggered", json_body(x[None]), "application/json", (403,)) for x in triggered]
    bad = malformed_requests(shape, max_request_bytes) if malformed else []  # type: ignore[arg-type]
    mix: list[LoadRequest] = []
    n = max(len(good), 2 * len(trig), 2 * len(bad))
    for i in range(n):
        mix.append(good[i % len(good)])
        if i % 2 == 0 and trig:
            mix.append(trig[(i // 2) % len(trig)])
        if i % 2 == 1 and bad:
            mix.append(bad[(i // 2) % len(bad)])
    return mix


def expectations(mix: Sequence[LoadRequest]) -> dict[str, tuple[int, ...]]:
    """Expected statuses per kind, merged over the mix."""
    out: dict[str, set[int]] = {}
    for r in mix:
        out.setdefault(r.kind, set()).update(r.expect)
    return {k: tuple(sorted(v)) for k, v in out.items()}


# ---------------------------------------------------------------- metrics port

_SAMPLE = re.compile(r'^guard_requests_total\{verdict="([^"]*)",ModelName="([^"]*)",[^}]*\}\s+(\S+)$', re.M)


def guard_requests_total(metrics_text: str, model: str) -> dict[str, float]:
    """``guard_requests_total`` by verdict for ``model`` from a Prometheus text page."""
    out: dict[str, float] = {}
    for verdict, name, value in _SAMPLE.findall(metrics_text):
        if name == model:
            out[verdict] = out.get(verdict, 0.0) + float(value)
    return out


def scrape_guard_requests(metrics_url: str, model: str, *, timeout_s: float = 10.0) -> dict[str, float]:
    """GET ``metrics_url`` (TorchServe's metrics port, no token) and return :func:`guard_requests_total`."""
    host, port, path = _target(metrics_url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path if path != "/" else "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
    if resp.status != 200:
        raise OSError(f"metrics port answered {resp.status}")
    return guard_requests_total(text, model)


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """``after - before`` per verdict, zero entries dropped (counters are cumulative)."""
    keys = set(before) | set(after)
    delta = {k: int(round(after.get(k, 0.0) - before.get(k, 0.0))) for k in keys}
    return {k: v for k, v in sorted(delta.items()) if v}


def wait_for_counts(metrics_url: str, model: str, before: dict[str, float], expected: dict[str, int], *,
                    timeout_s: float = 30.0, poll_s: float = 0.5) -> dict[str, int]:
    """Poll the metrics port (bounded) until the counter delta equals ``expected``; return the last delta.

    TorchServe's frontend reads the worker's metric lines asynchronously, so the counters lag the
    responses by up to a second or so.
    """
    deadline = time.monotonic() + timeout_s
    delta: dict[str, int] = {}
    for _ in range(int(timeout_s / poll_s) + 1):
        delta = counter_delta(before, scrape_guard_requests(metrics_url, model))
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return delta


__all__ = ["CONNECTION_ERROR", "LoadReport", "LoadRequest", "Outcome", "combine", "counter_delta", "expectations",
           "guard_requests_total", "json_body", "malformed_requests", "png_body", "post_once", "run_load",
           "scrape_guard_requests", "standard_mix", "wait_for_counts"]
