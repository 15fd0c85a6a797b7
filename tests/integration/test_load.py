"""The guarded endpoint under bounded concurrent load, and hostile input over real HTTP.

One TorchServe behind nginx (``ingress="nginx"``: loopback, token auth on at the ingress, started and
stopped by this module) serves the demo model
twice: ``demo`` with guard's handler and ``baseline`` with handlers/baseline_handler.py (same model,
decoding, TorchServe settings; no guard). The load driver (guard.bench.load) sends a mix of clean
(JSON and PNG), triggered and malformed requests from 16 threads, bounded in count and time:

* zero 5xx and zero dropped connections; every request gets the status its kind expects;
* every request is accounted for: the responses by status add up to the requests sent, and
  ``guard_requests_total`` on the metrics port moved by exactly the verdicts the clients were told;
* every 200/403 carries the guard's fields (no answer without a verdict);
* the audit log has one line per rejected request, keyed by the ``x-request-id`` the client got, with
  the verdict, reasons and scores the client got;
* latency p50/p99 of both handlers and their ratio are printed and written to ``load.json`` in the
  pytest tmp dir (figures, not assertions: the machine is shared; the runs alternate guarded,
  baseline, baseline, guarded so both sides see the same load).

Then a short hypothesis sample of hostile bodies over HTTP (form and multipart bodies TorchServe's
frontend would answer with 500 included): 200/400/403/413 with a JSON body, the worker never
restarts, and every body over guard's bound gets a JSON 413 (the handler's, or nginx's above TorchServe's
own bound), whatever its size.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serve_helpers import decided_inputs, require_nginx

from guard.bench import load
from guard.serving.trail import read_lines
from guard.torchserve import server as ts
from guard.torchserve.archive import make_archive
from guard.torchserve.client import http
from guard.torchserve.config import frontend_max_request_size, read_properties
from guard.torchserve.supervision import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUARDED, BASELINE = "demo", "baseline"
BASELINE_HANDLER = ts.BASELINE_HANDLER
MAX_BYTES = 1_048_576  # guard archive's default bound
CONCURRENCY = 16
TOTAL = 480  # per run; at ~100-300 requests/s on two shared cores, a few seconds each
DURATION_S = 45.0


@pytest.fixture(scope="module")
def data(demo_world, demo_profile) -> dict:
    """Clean inputs the offline guard passes and triggered ones it rejects, at the 4 decimals sent."""
    out = decided_inputs(demo_world, demo_profile, 48, 32)
    assert len(out["clean"]) >= 30 and len(out["triggered"]) >= 20
    return out


@pytest.fixture(scope="module")
def server(demo_world, demo_profile, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    require_nginx()
    store = tmp_path_factory.mktemp("load-store")
    common = dict(model_file=demo_world.model_file, weights=demo_world.weights, profile=demo_profile,
                  export_path=store, mode="enforce", batch_size=8, max_batch_delay=10)
    make_archive(name=GUARDED, **common)
    make_archive(name=BASELINE, handler=BASELINE_HANDLER, **common)
    run_dir = tmp_path_factory.mktemp("load-run")
    srv = ts.start(store, models={GUARDED: f"{GUARDED}.mar", BASELINE: f"{BASELINE}.mar"}, run_dir=run_dir,
                   timeout=300, ingress="nginx")
    try:
        yield srv
    finally:
        srv.stop()
        assert not srv.alive()


def url(srv: Server, model: str) -> str:
    return f"{srv.urls['inference']}/predictions/{model}"


def worker_pid(srv: Server, model: str) -> int:
    status, body = http(f"{srv.urls['management']}/models/{model}", key=srv.key("management"))
    assert status == 200, body
    (w,) = json.loads(body)[0]["workers"]
    return int(w["pid"])


def report_pending_counts(srv: Server, key: str) -> None:
    """Make the guarded worker report the pass counts it still sums (guard.serving.metrics.BatchedSink): an empty
    request answers 400 and counts an error, which the worker reports at once with everything pending."""
    status, body = http(url(srv, GUARDED), key=key, body=b'{"instances": []}', content_type="application/json")
    assert status == 400, body


@pytest.fixture(scope="module")
def loads(server, data, tmp_path_factory) -> dict:
    """The same mix against the guarded and the baseline handler (warm-up first), with counters around
    the guarded run; figures printed and written to load.json."""
    mix = load.standard_mix(data["clean"], data["triggered"], max_request_bytes=MAX_BYTES)
    key = server.key("inference")
    for model in (GUARDED, BASELINE):  # warm up both workers (first batches are slower)
        load.run_load(url(server, model), mix[:32], key=key, concurrency=4, total=32, duration_s=30)
    pid_before = worker_pid(server, GUARDED)
    report_pending_counts(server, key)
    before = load.scrape_guard_requests(f"{server.urls['metrics']}/metrics", GUARDED)
    runs: dict[str, list[load.LoadReport]] = {GUARDED: [], BASELINE: []}
    for model in (GUARDED, BASELINE, BASELINE, GUARDED):  # alternate halves: both sides see the same machine
        runs[model].append(load.run_load(url(server, model), mix, key=key, concurrency=CONCURRENCY, total=TOTAL // 2,
                                         duration_s=DURATION_S / 2))
    guarded, baseline = load.combine(runs[GUARDED]), load.combine(runs[BASELINE])
    report_pending_counts(server, key)
    expected = guarded.verdict_counts()
    reported = {**expected, "error": expected.get("error", 0) + 1}  # and the request that reported the pending counts
    delta = load.wait_for_counts(f"{server.urls['metrics']}/metrics", GUARDED, before, reported, timeout_s=30)
    delta = {k: v - (k == "error") for k, v in delta.items() if v - (k == "error")}
    g, b = guarded.to_dict(), baseline.to_dict()
    gc, bc = guarded.latency("clean", (200,)), baseline.latency("clean", (200,))  # same requests, same status
    figures = {
        "guarded": g, "baseline": b, "clean_200_latency": {"guarded": gc, "baseline": bc},
        "p50_ratio": round(gc["p50_ms"] / bc["p50_ms"], 3), "p99_ratio": round(gc["p99_ms"] / bc["p99_ms"], 3),
        "throughput_ratio": round(g["requests_per_s"] / b["requests_per_s"], 3),
        "metrics_delta": delta, "config": {"concurrency": CONCURRENCY, "total": TOTAL, "runs": "G B B G halves",
                                           "batch_size": 8, "max_batch_delay_ms": 10, "workers": 1,
                                           "token_auth": True},
    }
    path = tmp_path_factory.mktemp("load-figures") / "load.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n[load] guarded:  {guarded.summary()}\n[load] baseline: {baseline.summary()}\n"
          f"[load] p50 ratio {figures['p50_ratio']}, p99 ratio {figures['p99_ratio']}, throughput ratio "
          f"{figures['throughput_ratio']}; figures in {path}", file=sys.stderr)
    return {"mix": mix, "guarded": guarded, "baseline": baseline, "expected": expected, "delta": delta,
            "path": path, "pid_before": pid_before}


def test_guarded_load_has_no_5xx_and_every_request_gets_its_expected_status(loads):
    rep: load.LoadReport = loads["guarded"]
    assert rep.sent == TOTAL and rep.stopped_by == "count", rep.summary()
    assert [o.index for o in rep.outcomes] == list(range(rep.sent))  # none lost
    assert sum(rep.by_status().values()) == rep.sent
    assert rep.server_errors() == [], rep.server_errors()[:3]
    bad = rep.unexpected(load.expectations(loads["mix"]))
    assert bad == [], [(o.kind, o.status, o.body) for o in bad[:5]]
    kinds = rep.by_kind()
    assert kinds["clean"] == {200: kinds["clean"].get(200)} and kinds["triggered"] == {403: kinds["triggered"][403]}
    assert set(kinds["malformed"]) == {400} and set(kinds["oversized"]) == {413}
    assert all(isinstance(o.body, dict) for o in rep.outcomes)  # a JSON body for every answer


def test_every_200_and_403_carries_the_guards_verdict(loads):
    rep: load.LoadReport = loads["guarded"]
    assert rep.unguarded() == []
    answered = [o for o in rep.outcomes if o.status in (200, 403)]
    assert answered and all(o.verdicts == (["rejected"] if o.status == 403 else ["pass"]) for o in answered)


def test_metrics_count_exactly_the_requests_sent(loads):
    rep: load.LoadReport = loads["guarded"]
    assert sum(loads["expected"].values()) == rep.sent  # one count per single-instance or failed request
    assert loads["delta"] == loads["expected"]


def test_the_worker_was_never_restarted_by_the_load(server, loads):
    assert worker_pid(server, GUARDED) == loads["pid_before"]


def test_dynamic_batching_formed_batches_and_each_request_got_its_own_answer(server, loads):
    # the archive asks TorchServe for batches of up to 8 within 10 ms; 16 clients keep the queue full, so the
    # worker must have been handed fewer batches than requests (its log has one line per batch it received)
    rep: load.LoadReport = loads["guarded"]
    log = (server.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    batches = sum(1 for line in log.splitlines()
                  if f"-{GUARDED}_" in line and "Backend received inference" in line)
    handled = sum(1 for o in rep.outcomes if o.status in (200, 400, 403, 413))
    assert 0 < batches < 0.8 * handled, (batches, handled)
    # and each request of a batch was answered on its own: single triggered images 403, clean ones 200
    assert rep.unexpected({"clean": (200,), "triggered": (403,), "malformed": (400,), "oversized": (413,)}) == []


def test_baseline_load_has_no_5xx_and_the_figures_are_written(loads):
    rep: load.LoadReport = loads["baseline"]
    assert rep.sent == TOTAL and rep.server_errors() == []
    assert rep.unexpected({"clean": (200,), "triggered": (200,), "malformed": (400,), "oversized": (413,)}) == []
    figures = json.loads(Path(loads["path"]).read_text())
    for side in ("guarded", "baseline"):
        lat = figures[side]["latency_all"]
        assert 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert figures["p50_ratio"] > 0 and figures["throughput_ratio"] > 0


def test_audit_log_has_one_line_per_rejection_matching_what_the_client_was_told(server, loads):
    rep: load.LoadReport = loads["guarded"]
    path = server.run_dir / "logs" / f"guard-audit-{GUARDED}.log"
    deadline = time.monotonic() + 10
    rejected = {o.request_id: o for o in rep.outcomes if o.status == 403}
    lines: dict[str, dict] = {}
    while time.monotonic() < deadline:  # the worker writes synchronously; this only covers slow disks
        lines = {ln["request_id"]: ln for ln in read_lines(path)}
        if set(rejected) <= set(lines):
            break
        time.sleep(0.2)
    assert rejected and set(rejected) <= set(lines)
    for rid, o in rejected.items():
        told = o.body["predictions"][0]
        line = lines[rid]
        assert line["status"] == 403 and line["model"] == GUARDED and len(line["model_sha256"]) == 64
        assert {k: line[k] for k in ("verdict", "label", "reasons", "scores")} == \
            {k: told[k] for k in ("verdict", "label", "reasons", "scores")}
        assert "payload" not in line
    text = path.read_text()
    assert "Bearer" not in text and (server.key("inference") or "no-key") not in text  # never auth headers
    passed = {o.request_id for o in rep.outcomes if o.status == 200}
    assert not passed & set(lines)  # a pass is not audited


# ---------------------------------------------------------------- hostile input over HTTP

ALLOWED = {200, 400, 403, 413}


@st.composite
def hostile_body(draw) -> tuple[bytes, str | None]:
    kind = draw(st.sampled_from(["bytes", "truncated", "shape", "values", "image", "ctype", "empty"]))
    ctype = draw(st.sampled_from(["application/json", None, "text/plain", "image/png", "application/xml",
                                  "application/octet-stream", "multipart/form-data; boundary=zz",
                                  # each of these makes TorchServe 0.12's frontend answer 500 (or 403)
                                  # to some bodies; behind nginx its form decoders never run
                                  "application/x-www-form-urlencoded", "multipart/form-data",
                                  "multipart/form-data; boundary=", "text/plain; charset=foo"]))
    ok = np.full((1, 3, 32, 32), 0.5)
    if kind == "bytes":
        return draw(st.binary(max_size=400)), ctype
    if kind == "truncated":
        text = json.dumps({"instances": ok.tolist()}).encode()
        return text[: draw(st.integers(0, len(text) - 1))], "application/json"
    if kind == "shape":
        shape = (draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([31, 32, 33])),
                 draw(st.sampled_from([31, 32, 33])))
        return json.dumps({"instances": np.full(shape, 0.5).tolist()}).encode(), "application/json"
    if kind == "values":
        v = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1.5", "-0.1", "1e999", "true", "null", '"x"']))
        return json.dumps({"instances": ok.tolist()}).replace("0.5", v, 1).encode(), "application/json"
    if kind == "image":
        size = (draw(st.sampled_from([16, 32, 33])), draw(st.sampled_from([16, 32])))
        buf = io.BytesIO()
        Image.new(draw(st.sampled_from(["L", "RGB", "RGBA", "P"])), size).save(buf, format="PNG")
        raw = buf.getvalue()
        return raw[: draw(st.integers(8, len(raw)))], draw(st.sampled_from(["image/png", "image/jpeg", None]))
    if kind == "ctype":
        return json.dumps({"instances": ok.tolist()}).encode(), draw(st.sampled_from(
            ["image/png", "application/xml", "text/html", "multipart/form-data; boundary=zz"]))
    return b"", ctype


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hostile_body())
def test_hostile_bodies_over_http_end_in_allowed_statuses_with_json(server, body_and_type):
    body, ctype = body_and_type
    status, raw, err = load.post_once(url(server, GUARDED), body, content_type=ctype, key=server.key("inference"))
    assert status in ALLOWED, (status, raw[:300], err)
    parsed = json.loads(raw)
    assert ("error" in parsed) if status in (400, 413) else ("predictions" in parsed)


FRONTEND_500S = [  # (content type, body): what TorchServe 0.12's frontend answers 500 to by itself
    ("application/x-www-form-urlencoded", b"a=%zz"),
    ("multipart/form-data; boundary=", b"--\r\n\r\n"),
    ("multipart/form-data; boundary=x",
     b'--x\r\nContent-Disposition: form-data; name="data"\r\nContent-Type: text/plain; charset=foo\r\n\r\nabc\r\n'
     b"--x--\r\n"),
]


@pytest.mark.parametrize("ctype,body", FRONTEND_500S)
def test_bodies_torchserves_frontend_answers_500_get_guards_400_through_nginx(server, loads, ctype, body):
    """TorchServe 0.12's form decoders answer these with 500 before any handler runs (pinned on its
    private port); through nginx, which forwards them as octet-stream, they are a 400 with a JSON error."""
    key = server.key("inference")
    status, raw, _ = load.post_once(f"{server.upstream['inference']}/predictions/{GUARDED}", body,
                                    content_type=ctype, key=key)
    assert status == 500, (status, raw)
    status, raw, _ = load.post_once(url(server, GUARDED), body, content_type=ctype, key=key)
    assert status == 400 and "error" in json.loads(raw), (status, raw)
    assert worker_pid(server, GUARDED) == loads["pid_before"]


def test_a_form_body_and_a_multipart_upload_reach_the_guard(server, data):
    """``curl -d @request.json`` (form type) and ``curl -F data=@image.png`` (multipart) work."""
    key = server.key("inference")
    status, raw, _ = load.post_once(url(server, GUARDED), load.json_body(data["clean"][:1]),
                                    content_type="application/x-www-form-urlencoded", key=key)
    assert status == 200 and json.loads(raw)["predictions"][0]["verdict"] == "pass"
    png = load.png_body(data["clean"][0])
    form = (b'--b\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\nContent-Type: image/png'
            b"\r\n\r\n" + png + b"\r\n--b--\r\n")
    status, raw, _ = load.post_once(url(server, GUARDED), form, content_type="multipart/form-data; boundary=b", key=key)
    assert status == 200 and json.loads(raw)["predictions"][0]["verdict"] in ("pass", "flagged", "repaired")


def test_the_worker_survived_the_hostile_sample(server, loads, data):
    """Runs after the sample (file order): a clean request still passes, on the same worker process."""
    status, raw = http(url(server, GUARDED), key=server.key("inference"), body=load.json_body(data["clean"][:1]),
                          content_type="application/json", timeout=30)
    assert status == 200 and json.loads(raw)["predictions"][0]["verdict"] == "pass"
    assert worker_pid(server, GUARDED) == loads["pid_before"]


def test_every_body_over_guards_bound_gets_a_json_413_whatever_its_size(server):
    props = read_properties(server.config)
    frontend = int(props["max_request_size"])
    assert frontend == frontend_max_request_size([MAX_BYTES]) and frontend >= 2 * MAX_BYTES
    key = server.key("inference")
    for size, bound in ((MAX_BYTES + 1, MAX_BYTES), (2 * MAX_BYTES, MAX_BYTES),  # the handler's 413
                        (frontend + 1, frontend)):  # nginx's 413, where TorchServe would cut it
        body = b'{"instances": ' + b" " * (size - 17) + b"[]}"
        status, raw, err = load.post_once(url(server, GUARDED), body, key=key, timeout_s=60)
        assert status == 413 and f"limit of {bound} bytes" in json.loads(raw)["error"], (size, status, err)
    # TorchServe's own port, past nginx: an empty 413, or a reset while the client still sends
    status, raw, err = load.post_once(f"{server.upstream['inference']}/predictions/{GUARDED}", b" " * (frontend + 1),
                                      key=key, timeout_s=60)
    assert (status == 413 and raw == b"") or (status == load.CONNECTION_ERROR and "Reset" in str(err)), (status, err)
