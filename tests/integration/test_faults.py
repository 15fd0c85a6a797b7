"""Faults: a worker killed mid-load, a profile tampered with inside the archive, and fail-open.

On a real TorchServe behind nginx (loopback, token auth on at the ingress, one per module, stopped by its
process group in the fixture's teardown) serving the demo model and, beside it, an archive whose profile
was edited after ``guard archive`` (thresholds raised so nothing would ever be rejected):

* the tampered model never loads: one ``GUARD REFUSED TO LOAD`` line naming the edited file; while
  TorchServe retries its worker a request to it gets no answer (queued; the client times out),
  ``/ping`` still answers 200 Healthy (only the management API shows no READY worker), and once
  scaled to no worker it answers 503; never a prediction;
* ``kill -9`` of the guarded model's worker (its pid from the management API, checked to be a child
  of this TorchServe's JVM in this TorchServe's process group) in the middle of a 16-thread load:
  TorchServe starts a new worker, the endpoint recovers within RECOVERY_BOUND_S, triggered inputs are
  refused (403) again afterwards, errors happen only during the outage (TorchServe's 5xx relayed, or
  nginx's JSON 502), and no 200 ever lacks the guard's verdict. The recovery time is printed and
  written to ``faults.json`` in the pytest tmp dir.

In-process (no TorchServe start, through TorchServe's own model loader): ``fail_open`` is logged as a
WARNING at every load and only when chosen at archive time (``guard archive --fail-open`` says so on
stderr too); a profile whose files differ from the archive's digest is refused; an archive without a
digest (older guard) still loads and says the profile's integrity is not checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from serve_helpers import decided_inputs, require_nginx

from guard.bench import load
from guard.errors import ProfileError
from guard.torchserve import server as ts
from guard.torchserve.archive import make_archive
from guard.torchserve.client import http
from guard.torchserve.config import DEPLOY
from guard.torchserve.supervision import Server

GOOD, TAMPERED = "demo", "tampered"
RECOVERY_BOUND_S = 120.0  # kill -> first guarded answer; a worker restart is ~5-15 s on two idle cores
KILL_AFTER = 60  # requests answered before the kill


# ---------------------------------------------------------------- archives


def tamper_profile(src_mar: Path, dst_mar: Path) -> None:
    """Copy an archive, raising every check threshold in guard-profile/profile.json (a disabled guard)."""
    with zipfile.ZipFile(src_mar) as src, zipfile.ZipFile(dst_mar, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if item.filename.endswith("guard-profile/profile.json"):
                meta = json.loads(payload)
                for info in meta["checks"].values():
                    info["threshold"] = 1e30
                payload = json.dumps(meta, indent=2, sort_keys=True).encode()
            dst.writestr(item, payload)


@pytest.fixture(scope="module")
def store(demo_world, demo_profile, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("faults-store")
    make_archive(name=GOOD, model_file=demo_world.model_file, weights=demo_world.weights, profile=demo_profile,
                 export_path=store, mode="enforce", batch_size=4, max_batch_delay=5)
    tamper_profile(store / f"{GOOD}.mar", store / f"{TAMPERED}.mar")
    return store


@pytest.fixture(scope="module")
def data(demo_world, demo_profile) -> dict:
    out = decided_inputs(demo_world, demo_profile, 32, 24)
    assert len(out["clean"]) >= 16 and len(out["triggered"]) >= 12
    return out


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    require_nginx()
    run_dir = tmp_path_factory.mktemp("faults-run")
    srv = ts.start(store, models={GOOD: f"{GOOD}.mar", TAMPERED: f"{TAMPERED}.mar"}, run_dir=run_dir, timeout=300,
                   wait_for=[GOOD], ingress="nginx")
    try:
        yield srv
    finally:
        srv.stop()
        assert not srv.alive()


def workers(srv: Server, model: str) -> list[dict]:
    status, body = http(f"{srv.urls['management']}/models/{model}", key=srv.key("management"))
    assert status == 200, body
    return json.loads(body)[0]["workers"]


def predict(srv: Server, model: str, x: np.ndarray) -> tuple[int, object]:
    status, raw, err = load.post_once(f"{srv.urls['inference']}/predictions/{model}", load.json_body(x),
                                      key=srv.key("inference"))
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace") or err


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


# ---------------------------------------------------------------- tampered profile (real TorchServe)


@pytest.mark.integration
@pytest.mark.slow
def test_a_profile_tampered_inside_the_archive_never_serves_and_says_why(server, data):
    deadline = time.monotonic() + 60
    line = None
    while line is None and time.monotonic() < deadline:  # the first load attempt runs beside the good model's
        line = server.refusal(TAMPERED)
        time.sleep(0.5)
    assert line and "profile.json" in line and "modified after archiving" in line, line
    target = f"{server.urls['inference']}/predictions/{TAMPERED}"
    # While TorchServe keeps retrying the refusing worker it queues the request: no answer at all
    status, raw, err = load.post_once(target, load.json_body(data["triggered"][:1]), key=server.key("inference"),
                                      timeout_s=5)
    print(f"\n[faults] tampered model, worker retrying: status {status}, {raw[:200]!r}, {err}", file=sys.stderr)
    assert status in (load.CONNECTION_ERROR, 503) and b"predictions" not in raw, (status, raw, err)
    # TorchServe 0.12's /ping still says Healthy (documented in docs/hardening.md): readiness must ask
    # the management API whether the model has a READY worker, as Server.model_ready does
    ping = http(f"{server.urls['inference']}/ping", key=server.key("inference"))
    assert ping[0] == 200 and b"Healthy" in ping[1], ping
    assert not any(w["status"] == "READY" for w in workers(server, TAMPERED)) and not server.model_ready(TAMPERED)
    assert server.model_ready(GOOD)
    # scaled to no worker (allowed with the management key): TorchServe answers 503 at once
    status, _ = http(f"{server.urls['management']}/models/{TAMPERED}?min_worker=0&max_worker=0",
                        key=server.key("management"), method="PUT")
    assert status in (200, 202)
    for x in (data["triggered"][:1], data["clean"][:1]):
        status, body = predict(server, TAMPERED, x)
        print(f"[faults] tampered model, no worker: {status} {body}", file=sys.stderr)
        assert status == 503 and "predictions" not in json.dumps(body), (status, body)


# ---------------------------------------------------------------- worker killed mid-load


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_load_is_restarted_and_nothing_is_answered_unguarded(server, data, tmp_path):
    (w,) = workers(server, GOOD)
    old = int(w["pid"])
    java = _ppid(old)
    # only ever signal our own process: the worker is a python child of this TorchServe's JVM, in its group
    assert _comm(java) == "java" and os.getpgid(old) == server.pid and os.getpgid(java) == server.pid
    mix = load.standard_mix(data["clean"], data["triggered"], max_request_bytes=1 << 20, malformed=False)
    killed: dict[str, float] = {}
    lock = threading.Lock()

    def on_progress(n: int) -> None:
        with lock:
            if n >= KILL_AFTER and "at" not in killed:
                os.kill(old, signal.SIGKILL)
                killed["at"] = time.monotonic()

    report = load.run_load(f"{server.urls['inference']}/predictions/{GOOD}", mix, key=server.key("inference"),
                           concurrency=16, total=400, duration_s=60, timeout_s=60, on_progress=on_progress)
    assert "at" in killed, report.summary()
    t_kill = killed["at"] - report.started_monotonic

    # the first guarded answer to a request sent after the kill: in the load, else by polling (bounded)
    after = [o for o in report.outcomes if o.sent_at_s > t_kill and o.status in (200, 403)]
    recovered = min((o.sent_at_s + o.latency_s for o in after), default=None)
    polled = 0
    poll_deadline = killed["at"] + RECOVERY_BOUND_S
    while recovered is None and time.monotonic() < poll_deadline:
        polled += 1
        status, _ = predict(server, GOOD, data["clean"][:1])
        if status == 200:
            recovered = time.monotonic() - report.started_monotonic
        else:
            time.sleep(0.5)
    assert recovered is not None, f"no guarded answer within {RECOVERY_BOUND_S} s of the kill: {report.summary()}"
    recovery_s = recovered - t_kill

    # a new worker, READY, and guarding again
    (w2,) = workers(server, GOOD)
    assert int(w2["pid"]) != old and w2["status"] == "READY"
    assert not Path(f"/proc/{old}").exists() or _comm(old) != "python3"
    status, body = predict(server, GOOD, data["triggered"][:1])
    assert status == 403 and body["predictions"][0]["verdict"] == "rejected"
    status, body = predict(server, GOOD, data["clean"][:1])
    assert status == 200 and body["predictions"][0]["verdict"] == "pass"

    # nothing answered without the guard; errors only while the worker was down
    assert report.unguarded() == []
    answered = [o for o in report.outcomes if o.status in (200, 403)]
    assert answered and all(o.verdicts == (["rejected"] if o.status == 403 else ["pass"]) for o in answered)
    for o in report.outcomes:
        assert o.status in (200, 403) or (o.status >= 500 or o.status == load.CONNECTION_ERROR), o
        if o.status >= 500:
            assert isinstance(o.body, dict), o  # a JSON error (TorchServe's, or nginx's 502), never an HTML page
        if o.status not in (200, 403):
            assert t_kill - 1.0 <= o.sent_at_s + o.latency_s and o.sent_at_s <= recovered, o
    errors = report.server_errors()
    figures = {"recovery_s": round(recovery_s, 2), "killed_after_requests": KILL_AFTER, "old_pid": old,
               "new_pid": int(w2["pid"]), "errors_during_outage": len(errors),
               "error_statuses": sorted({o.status for o in errors}), "polls_after_load": polled,
               "load": report.to_dict()}
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n[faults] worker {old} killed after {KILL_AFTER} answers; guarded answers again after {recovery_s:.1f} s "
          f"(new worker {w2['pid']}); {len(errors)} requests failed during the outage "
          f"(statuses {figures['error_statuses']}); {report.summary()}; figures in {path}", file=sys.stderr)
    assert recovery_s < RECOVERY_BOUND_S


# ---------------------------------------------------------------- in-process: fail-open, digest


@pytest.fixture(scope="module")
def unpacked(store, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("faults-unpacked") / GOOD
    with zipfile.ZipFile(store / f"{GOOD}.mar") as z:
        z.extractall(base)
    return base


def copy_with(unpacked: Path, tmp_path: Path, **handler_cfg) -> Path:
    d = tmp_path / f"{GOOD}-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(unpacked, d)
    cfg = yaml.safe_load((d / "model-config.yaml").read_text())
    for k, v in handler_cfg.items():
        if v is None:
            cfg["handler"].pop(k, None)
        else:
            cfg["handler"][k] = v
    (d / "model-config.yaml").write_text(yaml.safe_dump(cfg))
    return d


def load_in_process(model_dir: Path, monkeypatch):
    """The handler loaded as a TorchServe worker loads it (model dir on sys.path, deploy's metrics)."""
    pytest.importorskip("ts")
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    monkeypatch.syspath_prepend(str(model_dir))
    sys.modules.pop("guarded_handler", None)
    metrics = MetricsCacheYamlImpl(config_file_path=str(DEPLOY / "metrics.yaml"))
    metrics.initialize_cache()
    try:
        return TsModelLoader().load(GOOD, str(model_dir), handler="guarded_handler.py", gpu_id=None, batch_size=4,
                                    metrics_cache=metrics)
    finally:
        sys.modules.pop("guarded_handler", None)


def _messages(caplog, level: int, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and words in r.getMessage()]


def test_fail_open_is_logged_as_a_warning_at_every_load_and_only_when_chosen(unpacked, tmp_path, monkeypatch, caplog):
    opened = copy_with(unpacked, tmp_path, fail_open=True)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            load_in_process(opened, monkeypatch)
    assert len(_messages(caplog, logging.WARNING, "GUARD FAIL-OPEN")) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        handler = load_in_process(unpacked, monkeypatch)._entry_point.__self__
    assert handler.service.fail_open is False and not _messages(caplog, logging.WARNING, "FAIL-OPEN")


def test_guard_archive_defaults_to_fail_closed_and_warns_on_fail_open(demo_world, demo_profile, tmp_path, capsys):
    from guard.cli import main

    common = ["archive", "--model-file", str(demo_world.model_file), "--weights", str(demo_world.weights),
              "--profile", str(demo_profile), "--export-path", str(tmp_path)]
    assert main([*common, "--name", "closed"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main([*common, "--name", "opened", "--fail-open"]) == 0
    assert "WARNING: --fail-open" in capsys.readouterr().err
    for name, expected in (("closed", False), ("opened", True)):
        with zipfile.ZipFile(tmp_path / f"{name}.mar") as z:
            assert yaml.safe_load(z.read("model-config.yaml"))["handler"]["fail_open"] is expected


@pytest.mark.parametrize("what", ["thresholds", "tensors"])
def test_a_profile_edited_after_archiving_is_refused_in_process(unpacked, tmp_path, monkeypatch, caplog, what):
    d = copy_with(unpacked, tmp_path)
    if what == "thresholds":
        p = d / "guard-profile" / "profile.json"
        meta = json.loads(p.read_text())
        for info in meta["checks"].values():
            info["threshold"] = 1e30
        p.write_text(json.dumps(meta))
        name = "profile.json"
    else:
        p = d / "guard-profile" / "tensors.safetensors"
        raw = bytearray(p.read_bytes())
        raw[-5] ^= 0x01  # one flipped bit in the tensor data: still a loadable file, not the archived one
        p.write_bytes(bytes(raw))
        name = "tensors.safetensors"
    with caplog.at_level(logging.ERROR), pytest.raises(ProfileError, match=name):
        load_in_process(d, monkeypatch)
    (line,) = [r.getMessage() for r in caplog.records if "GUARD REFUSED TO LOAD" in r.getMessage()]
    assert name in line and "modified after archiving" in line


def test_an_archive_without_a_profile_digest_still_loads_and_says_so(unpacked, tmp_path, monkeypatch, caplog):
    d = copy_with(unpacked, tmp_path, profile_sha256=None)
    with caplog.at_level(logging.INFO):
        handler = load_in_process(d, monkeypatch)._entry_point.__self__
    assert handler.initialized
    assert _messages(caplog, logging.WARNING, "records no profile digest")



def test_an_audit_log_that_cannot_be_opened_refuses_the_load(unpacked, tmp_path, monkeypatch, caplog):
    """Asked to keep an audit trail and unable to: fail closed, like any other load failure."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    d = copy_with(unpacked, tmp_path, audit_log=str(blocker / "audit.log"))
    with caplog.at_level(logging.ERROR), pytest.raises(Exception, match="audit log"):
        load_in_process(d, monkeypatch)
    assert [r for r in caplog.records if "GUARD REFUSED TO LOAD" in r.getMessage() and "audit log" in r.getMessage()]
