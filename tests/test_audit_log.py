"""guard.serving.trail without TorchServe: which verdicts are written, what a line holds (and never holds),
where the file goes, and that it rotates by size."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from guard.online.policy import Decision
from guard.serving.trail import (
    AUDITED_VERDICTS,
    ENV_PATH,
    AuditLog,
    decode_payload,
    read_lines,
    resolve_path,
)

SHA = "ab" * 32


def decision(verdict: str, label: int | None = 6) -> Decision:
    return Decision(None if verdict == "rejected" else label, None if verdict == "rejected" else [0.1, 0.9],
                    verdict, ["neuron", "feature"] if verdict != "pass" else [], {"neuron": 9.5, "feature": 3.25})


def test_only_non_pass_verdicts_are_written_with_what_the_client_was_told(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, model="demo", model_sha256=SHA, mode="enforce") as log:
        written = [log.write(request_id=f"r{i}", instance=0, status=200 if v != "rejected" else 403,
                              decision=decision(v)) for i, v in enumerate(["pass", "rejected", "repaired",
                                                                          "flagged", "error"])]
    assert written[0] is None and all(w is not None for w in written[1:])
    lines = read_lines(path)
    assert [ln["verdict"] for ln in lines] == ["rejected", "repaired", "flagged", "error"]
    assert {ln["verdict"] for ln in lines} == set(AUDITED_VERDICTS)
    rejected = lines[0]
    sent = decision("rejected").to_dict()
    assert rejected["request_id"] == "r1" and rejected["status"] == 403 and rejected["instance"] == 0
    assert rejected["model"] == "demo" and rejected["model_sha256"] == SHA and rejected["mode"] == "enforce"
    assert {k: rejected[k] for k in ("label", "reasons", "scores", "verdict")} == \
        {k: sent[k] for k in ("label", "reasons", "scores", "verdict")}
    assert rejected["time"].endswith("Z") and "T" in rejected["time"]
    assert "payload" not in rejected  # never the payload by default
    assert lines == written[1:]  # the file holds exactly what write() returned
    # one JSON object per line, nothing else in the file
    assert all(json.loads(raw) for raw in path.read_text().splitlines())


def test_payload_only_with_log_payloads_and_it_round_trips_exactly(tmp_path):
    x = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    with AuditLog(tmp_path / "a.log", model="m", model_sha256=SHA, mode="enforce") as log:
        assert "payload" not in log.write(request_id="a", instance=0, status=403, decision=decision("rejected"),
                                           payload=x)
    with AuditLog(tmp_path / "b.log", model="m", model_sha256=SHA, mode="enforce", log_payloads=True) as log:
        log.write(request_id="b", instance=1, status=200, decision=decision("flagged"), payload=x)
    (line,) = read_lines(tmp_path / "b.log")
    np.testing.assert_array_equal(decode_payload(line["payload"]), x)


def test_rotates_by_size_and_keeps_every_line_across_backups(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, model="m", model_sha256=SHA, mode="shadow", max_bytes=2000, backups=50) as log:
        for i in range(40):
            log.write(request_id=f"r{i:03d}", instance=0, status=200, decision=decision("flagged"))
    backups = sorted(p.name for p in tmp_path.iterdir() if p.name != "audit.log")
    assert backups and all(p.startswith("audit.log.") for p in backups)
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert [ln["request_id"] for ln in read_lines(path)] == [f"r{i:03d}" for i in range(40)]


def test_rotation_drops_the_oldest_beyond_the_backup_count(tmp_path):
    path = tmp_path / "audit.log"
    with AuditLog(path, model="m", model_sha256=SHA, mode="shadow", max_bytes=1000, backups=2) as log:
        for i in range(60):
            log.write(request_id=f"r{i:03d}", instance=0, status=200, decision=decision("flagged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]
    ids = [ln["request_id"] for ln in read_lines(path)]
    assert ids == sorted(ids) and ids[-1] == "r059" and len(ids) < 60


def test_non_finite_scores_are_written_as_null_never_failing_the_request(tmp_path):
    d = Decision(None, None, "rejected", ["neuron"], {"neuron": float("inf"), "feature": float("nan")})
    with AuditLog(tmp_path / "a.log", model="m", model_sha256=SHA, mode="enforce") as log:
        entry = log.write(request_id="x", instance=0, status=403, decision=d)
    assert entry["scores"] == {"neuron": None, "feature": None}
    assert read_lines(tmp_path / "a.log")[0]["scores"] == {"neuron": None, "feature": None}


def test_lines_do_not_reach_other_loggers(tmp_path, caplog):
    with caplog.at_level("DEBUG"), AuditLog(tmp_path / "a.log", model="m", model_sha256=SHA, mode="enforce") as log:
        log.write(request_id="secret-id", instance=0, status=403, decision=decision("rejected"))
    assert not [r for r in caplog.records if "secret-id" in r.getMessage()]


def test_path_resolution_env_then_config_then_torchserve_log_dir_then_model_dir(tmp_path):
    md = tmp_path / "model"
    assert resolve_path(None, model="demo", model_dir=md, env={}) == md / "guard-audit-demo.log"
    assert resolve_path(None, model="demo", model_dir=md, env={"LOG_LOCATION": "/var/ts"}) == \
        tmp_path.joinpath("/var/ts/guard-audit-demo.log")
    assert resolve_path("x/{model}-{pid}.log", model="a/b", model_dir=md, env={}) == md / f"x/a_b-{os.getpid()}.log"
    assert resolve_path("/abs/a.log", model="m", model_dir=md, env={"LOG_LOCATION": "/var/ts"}).as_posix() == \
        "/abs/a.log"
    assert resolve_path("/abs/a.log", model="m", model_dir=md, env={ENV_PATH: "/env/e.log"}).as_posix() == \
        "/env/e.log"


def test_from_config_reads_the_handler_section(tmp_path):
    cfg = {"audit_log": str(tmp_path / "logs" / "{model}.log"), "audit_max_bytes": 1234, "audit_backups": 2,
           "log_payloads": "true"}
    with AuditLog.from_config(cfg, model="demo", model_sha256=SHA, mode="repair", model_dir=tmp_path, env={}) as log:
        assert log.path == tmp_path / "logs" / "demo.log" and log.path.parent.is_dir()
        assert (log.max_bytes, log.backups, log.log_payloads) == (1234, 2, True)
    with pytest.raises(ValueError):
        AuditLog.from_config({"audit_max_bytes": 0}, model="m", model_sha256=SHA, mode="enforce",
                             model_dir=tmp_path, env={})


# ---------------------------------------------------------------- through the handler (TorchServe's worker code)


def test_handler_writes_one_line_per_non_pass_instance_matching_the_reply(demo_world, demo_profile, tmp_path,
                                                                          monkeypatch):
    """The guarded handler, loaded by TorchServe's own loader, answers a mixed batch; the audit log then
    holds exactly one line per rejected instance with the request id, status, verdict, label, reasons
    and scores of the reply, and (``log_payloads``) the instance the guard saw; no pass, no header."""
    pytest.importorskip("ts")
    import struct
    import sys
    import zipfile

    import yaml
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import TsModelLoader

    from guard import Guard, Profile, load_model
    from guard.data import load_npz
    from guard.torchserve.archive import make_archive
    from guard.torchserve.config import DEPLOY

    mar, _ = make_archive(name="demo", model_file=demo_world.model_file, weights=demo_world.weights,
                          profile=demo_profile, export_path=tmp_path / "mar", log_payloads=True,
                          audit_log=str(tmp_path / "audit" / "{model}.jsonl"))
    model_dir = tmp_path / "demo"
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    assert yaml.safe_load((model_dir / "model-config.yaml").read_text())["handler"]["log_payloads"] is True
    monkeypatch.syspath_prepend(str(model_dir))
    monkeypatch.delenv("GUARD_AUDIT_LOG", raising=False)
    sys.modules.pop("guarded_handler", None)
    metrics = MetricsCacheYamlImpl(config_file_path=str(DEPLOY / "metrics.yaml"))
    metrics.initialize_cache()
    service = TsModelLoader().load("demo", str(model_dir), handler="guarded_handler.py", gpu_id=None, batch_size=8,
                                   metrics_cache=metrics)
    sys.modules.pop("guarded_handler", None)
    service.set_cl_socket(None)

    guard = Guard(load_model(demo_world.model_file, demo_world.weights), Profile.load(demo_profile))
    xh, _ = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    clean = xh[:16][[d.verdict == "pass" for d in guard.predict(xh[:16])]][:2]
    trig = xt[:16][[d.verdict == "rejected" for d in guard.predict(xt[:16])]][:3]
    bodies = {"c": {"instances": clean[:1].tolist()}, "t": {"instances": trig[:1].tolist()},
              "m": {"instances": np.concatenate([clean[1:2], trig[1:3]]).tolist()}, "bad": {"instances": [[0.5]]}}
    batch = [{"requestId": rid.encode(), "headers": [{"name": b"Authorization", "value": b"Bearer s3cret"},
                                                     {"name": b"Content-Type", "value": b"application/json"}],
              "parameters": [{"name": "body", "contentType": "application/json", "value": b}]}
             for rid, b in bodies.items()]
    raw = bytes(service.predict(batch))
    replies = _decode_reply(raw, struct)
    assert {r["id"]: r["status"] for r in replies} == {"c": 200, "t": 403, "m": 200, "bad": 400}

    path = tmp_path / "audit" / "demo.jsonl"
    lines = read_lines(path)
    told = [(r["id"], j, r["status"], p) for r in replies if "predictions" in r["body"]
            for j, p in enumerate(r["body"]["predictions"]) if p["verdict"] != "pass"]
    assert [(ln["request_id"], ln["instance"], ln["status"]) for ln in lines] == [t[:3] for t in told]
    assert len(lines) == 3  # the single triggered request and two instances of the mixed one
    sent = {"t": trig[:1], "m": np.concatenate([clean[1:2], trig[1:3]])}
    for ln, (rid, j, _, p) in zip(lines, told):
        assert {k: ln[k] for k in ("verdict", "label", "reasons", "scores")} == \
            {k: p[k] for k in ("verdict", "label", "reasons", "scores")}
        assert ln["model"] == "demo" and ln["model_sha256"] == guard.profile.model_sha256 and ln["mode"] == "enforce"
        np.testing.assert_allclose(decode_payload(ln["payload"]), sent[rid][j], atol=1e-6)
    assert "s3cret" not in path.read_text() and "Authorization" not in path.read_text()


def _decode_reply(msg: bytes, struct) -> list[dict]:
    """TorchServe's predict response, per request: id, status, JSON body."""
    pos = 8 + struct.unpack_from("!i", msg, 4)[0]
    out = []
    while True:
        (n,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        if n == -1:
            return out
        rid = msg[pos:pos + n].decode()
        pos += n
        (n,) = struct.unpack_from("!i", msg, pos)
        pos += 4 + n  # content type
        (status,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        (n,) = struct.unpack_from("!i", msg, pos)
        pos += 4 + n  # phrase
        (k,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        for _ in range(2 * k):
            (n,) = struct.unpack_from("!i", msg, pos)
            pos += 4 + n
        (n,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        out.append({"id": rid, "status": status, "body": json.loads(msg[pos:pos + n])})
        pos += n
