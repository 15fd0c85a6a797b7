"""GuardService and BaselineService without any TorchServe object: requests in, replies out.

The archive directory is laid out as ``guard archive`` lays it out (model file, weights,
``guard-profile/``, a model-config whose ``handler:`` section records the profile's digest), so
what is tested here is what the TorchServe handler serves; tests/online/test_handler.py checks the
same through TorchServe's own worker code.
"""

from __future__ import annotations

import doctest
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from guard import Guard, Profile, load_model
from guard.data import load_npz
from guard.errors import GuardError, InputError, ProfileError, ProfileMismatch
from guard.serving import REFUSAL_MARK
from guard.serving import service as service_module
from guard.serving.integrity import profile_digest
from guard.serving.metrics import BatchedSink, InMemorySink
from guard.serving.service import BaselineService, GuardService, Reply, Request
from guard.serving.trail import read_lines

JSON = "application/json"


def archive_dir(world, profile: Path, target: Path, **handler) -> tuple[Path, dict]:
    """An unpacked archive as guard archive writes it; ``handler`` overrides the handler section."""
    target.mkdir(parents=True)
    shutil.copy(world.model_file, target / "model.py")
    shutil.copy(world.weights, target / "weights.pt")
    shutil.copytree(profile, target / "guard-profile")
    section = {"mode": "enforce", "fail_open": False, "max_request_bytes": 1_048_576, "profile": "guard-profile",
               "model_file": "model.py", "weights": "weights.pt",
               "profile_sha256": profile_digest(target / "guard-profile"), "audit_log": str(target / "audit.log")}
    section.update(handler)
    config = {"batchSize": 8, "handler": section}
    (target / "model-config.yaml").write_text(yaml.safe_dump(config))
    return target, config


@pytest.fixture(autouse=True)
def _no_audit_env(monkeypatch):
    monkeypatch.delenv("GUARD_AUDIT_LOG", raising=False)
    monkeypatch.delenv("LOG_LOCATION", raising=False)


@pytest.fixture(scope="module")
def loaded(demo_world, demo_profile, tmp_path_factory):
    """The service loaded from an archive directory, with an in-memory sink; closed after the module."""
    d, config = archive_dir(demo_world, demo_profile, tmp_path_factory.mktemp("svc") / "demo")
    svc = GuardService.from_archive_config(d, config, model_name="demo", sink=InMemorySink())
    yield svc
    svc.close()


@pytest.fixture
def service(loaded):
    """The loaded service with fresh counters."""
    loaded.sink = InMemorySink()
    return loaded


@pytest.fixture(scope="module")
def data(demo_world, demo_profile):
    guard = Guard(load_model(demo_world.model_file, demo_world.weights), Profile.load(demo_profile))
    xh, _ = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    clean = xh[:32][[d.verdict == "pass" for d in guard.predict(xh[:32])]]
    trig = xt[:32][[d.verdict == "rejected" for d in guard.predict(xt[:32])]]
    assert len(clean) >= 8 and len(trig) >= 8
    return {"clean": clean, "triggered": trig, "guard": guard}


def req(x: np.ndarray, rid: str | None = None, **kw) -> Request:
    return Request({"instances": x.tolist()}, request_id=rid, content_type=JSON, **kw)


def test_a_mixed_batch_gets_one_status_per_request_and_the_metrics_of_each(service, data):
    c, t = data["clean"], data["triggered"]
    big = json.dumps({"instances": c[:1].tolist()}).encode()
    replies = service.handle([
        req(c[:1], "clean"),
        Request(b'{"instances": [[0.5, 2.0]]}', request_id="malformed", content_type=JSON),
        req(t[:1], "triggered"),
        Request(big, {"Content-Length": str(10 * service.max_request_bytes)}, "too-large", JSON),
        req(np.concatenate([c[1:3], t[1:2]]), "multi"),
        Request(b"", request_id="empty", content_type=JSON),
        Request(json.dumps({"instances": c[3:4].tolist()}).encode(), {"Content-Type": "application/json"}, "hdr"),
    ])
    assert all(isinstance(r, Reply) and r.content_type == JSON for r in replies)
    assert [r.status for r in replies] == [200, 400, 403, 413, 200, 400, 200]
    assert "3x32x32" in replies[1].body["error"] and set(replies[1].body) == {"error"}
    assert "bytes" in replies[3].body["error"]
    (ok,) = replies[0].body["predictions"]
    offline = data["guard"].predict(c[:1])[0].to_dict()
    assert ok["verdict"] == "pass" and ok["label"] == offline["label"]
    assert ok["probabilities"] == pytest.approx(offline["probabilities"], abs=1e-4)
    (rej,) = replies[2].body["predictions"]
    assert rej["verdict"] == "rejected" and rej["label"] is None and rej["probabilities"] is None and rej["reasons"]
    assert [p["verdict"] for p in replies[4].body["predictions"]] == ["pass", "pass", "rejected"]
    assert replies[6].body["predictions"][0]["verdict"] == "pass"  # content type read from the header

    sink = service.sink
    assert dict(sink.requests_total) == {"pass": 4, "rejected": 2, "error": 3}
    assert sum(sink.rejections_total.values()) == 2 and len(sink.latencies) == 1


def test_a_batch_of_only_bad_requests_never_reaches_the_guard(service, monkeypatch):
    monkeypatch.setattr(service.guard, "run", lambda x: pytest.fail("the guard ran"))
    replies = service.handle([Request(b"", content_type=JSON), Request(b"<xml/>", content_type="application/xml")])
    assert [r.status for r in replies] == [400, 400]
    assert "unsupported Content-Type" in replies[1].body["error"]
    assert dict(service.sink.requests_total) == {"error": 2} and not service.sink.latencies


def test_a_decoder_bug_answers_that_request_500_and_the_rest_normally(service, data, monkeypatch):
    real = service_module.decode_payload

    def flaky(body, *a, **kw):
        if body == b"boom":
            raise RuntimeError("decoder bug")
        return real(body, *a, **kw)

    monkeypatch.setattr(service_module, "decode_payload", flaky)
    replies = service.handle([Request(b"boom", content_type=JSON), req(data["clean"][:1])])
    assert [r.status for r in replies] == [500, 200]
    assert "internal error" in replies[0].body["error"] and "decoder bug" not in replies[0].body["error"]


def _boom(x):
    raise RuntimeError("check exploded")


def test_guard_failure_fails_closed_by_default(service, data, monkeypatch):
    monkeypatch.setattr(service.guard, "run", _boom)
    replies = service.handle([req(data["clean"][:2]), Request(b"{}", content_type=JSON)])
    assert [r.status for r in replies] == [503, 400]
    assert "not answering unguarded" in replies[0].body["error"] and "RuntimeError" in replies[0].body["error"]
    assert "exploded" not in replies[0].body["error"]  # details go to the log, not to clients
    assert dict(service.sink.requests_total) == {"error": 3}


def test_guard_failure_with_fail_open_answers_the_bare_model_marked_error(service, data, monkeypatch, tmp_path):
    from guard.serving.trail import AuditLog

    audit = AuditLog(tmp_path / "audit.log", model="demo", model_sha256="x" * 64, mode="enforce")
    opened = GuardService(service.guard, fail_open=True, audit=audit, sink=InMemorySink())
    monkeypatch.setattr(service.guard, "run", _boom)
    (reply,) = opened.handle([req(data["triggered"][:1], "t")])
    audit.close()
    assert reply.status == 200
    (p,) = reply.body["predictions"]
    assert p["verdict"] == "error" and p["reasons"] == ["guard_error"] and p["label"] == 6
    assert len(p["probabilities"]) == 10 and sum(p["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert dict(opened.sink.requests_total) == {"error": 1}
    (line,) = read_lines(tmp_path / "audit.log")
    assert line["request_id"] == "t" and line["verdict"] == "error" and line["status"] == 200


def test_audit_lines_for_what_was_refused_only(service, data):
    before = len(read_lines(service.audit.path)) if service.audit.path.exists() else 0
    replies = service.handle([req(data["clean"][:1], "c"), req(data["triggered"][:1], "t"),
                              req(np.concatenate([data["clean"][1:2], data["triggered"][1:2]]), "m")])
    assert [r.status for r in replies] == [200, 403, 200]
    lines = read_lines(service.audit.path)[before:]
    assert [(ln["request_id"], ln["instance"], ln["status"], ln["verdict"]) for ln in lines] == [
        ("t", 0, 403, "rejected"), ("m", 1, 200, "rejected")]
    assert lines[0]["reasons"] == replies[1].body["predictions"][0]["reasons"] and "payload" not in lines[0]


def test_the_service_holds_one_feature_hook_and_is_warm_after_load(service):
    assert service.guard._tap is not None  # session held for the service's life


# ---------------------------------------------------------------- refusing to load


def _refused(d: Path, config: dict, error: type, caplog) -> str:
    with caplog.at_level(logging.ERROR), pytest.raises(error) as info:
        GuardService.from_archive_config(d, config, model_name="demo")
    (line,) = [r.getMessage() for r in caplog.records if REFUSAL_MARK in r.getMessage()]
    assert str(info.value) in line
    return line


def test_refuses_a_profile_edited_after_archiving(demo_world, demo_profile, tmp_path, caplog):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a")
    p = d / "guard-profile" / "profile.json"
    meta = json.loads(p.read_text())
    for info in meta["checks"].values():
        info["threshold"] = 1e30
    p.write_text(json.dumps(meta))
    line = _refused(d, config, ProfileError, caplog)
    assert "profile.json" in line and "modified after archiving" in line


def test_refuses_a_profile_built_for_another_model(demo_world, demo_profile, tmp_path, caplog):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a")
    state = torch.load(d / "weights.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    torch.save(state, d / "weights.pt")
    _refused(d, config, ProfileMismatch, caplog)


@pytest.mark.parametrize("change, error", [({"mode": "yolo"}, InputError), ({"max_request_bytes": 0}, GuardError),
                                           ({"model_file": None, "weights": None}, GuardError),
                                           ({"metrics_flush_seconds": "soon"}, GuardError),
                                           ({"metrics_flush_seconds": -1}, GuardError)])
def test_refuses_a_bad_handler_section(demo_world, demo_profile, tmp_path, caplog, change, error):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a", **change)
    _refused(d, config, error, caplog)


def test_a_served_model_reports_pass_counts_summed_and_refusals_with_their_batch(demo_world, demo_profile, tmp_path,
                                                                                 data):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a", metrics_flush_seconds=30)
    counted = InMemorySink()
    with GuardService.from_archive_config(d, config, model_name="demo", sink=counted) as svc:
        assert isinstance(svc.sink, BatchedSink) and svc.sink.interval == 30
        for x in data["clean"][:3]:
            svc.handle([req(x[None])])
        # the first batch is reported at once (the series appear with the first traffic), the next passes wait
        assert counted.requests_total == {"pass": 1} and svc.sink.pending == 2
        assert len(counted.latencies) == 1  # the first batch's latency; the next ones within 3 s are not sampled
        (reply,) = svc.handle([req(data["triggered"][:1])])
        assert reply.status == 403
        assert dict(counted.requests_total) == {"pass": 3, "rejected": 1}
        assert sum(counted.rejections_total.values()) == 1
        svc.handle([req(data["clean"][3:4])])
    assert counted.requests_total["pass"] == 4  # close() reports what was pending


def test_an_archive_without_a_digest_loads_with_a_warning(demo_world, demo_profile, tmp_path, caplog):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a", profile_sha256=None, fail_open=True)
    with caplog.at_level(logging.INFO):
        GuardService.from_archive_config(d, config, model_name="demo").close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("records no profile digest" in w for w in warnings)
    assert any("GUARD FAIL-OPEN" in w for w in warnings)


# ---------------------------------------------------------------- baseline, docs


def test_the_baseline_shares_decoding_and_answers_the_bare_model(demo_world, demo_profile, tmp_path, data):
    d, config = archive_dir(demo_world, demo_profile, tmp_path / "a")
    base = BaselineService.from_archive_config(d, config)
    assert base.max_request_bytes == 1_048_576
    replies = base.handle([req(data["triggered"][:2]), Request(b"{", content_type=JSON),
                           Request(b"x", {"content-length": "9999999"}, content_type=JSON)])
    assert [r.status for r in replies] == [200, 400, 413]
    preds = replies[0].body["predictions"]
    assert [set(p) for p in preds] == [{"label", "probabilities"}] * 2 and preds[0]["label"] == 6


def test_the_usage_example_in_the_docstring_runs(demo_world, demo_profile, tmp_path):
    d, _ = archive_dir(demo_world, demo_profile, tmp_path / "a")
    (test,) = [t for t in doctest.DocTestFinder().find(GuardService, "GuardService", globs={"model_dir": d})
               if t.examples]
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and len(test.examples) >= 5
