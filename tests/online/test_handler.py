"""handlers/guarded_handler.py in-process, through TorchServe's own Python worker code.

The archive is built by ``guard archive``'s code and unpacked; ``ts.model_loader.TsModelLoader``
loads the handler exactly as a worker does (one class per handler file, model-config.yaml into
``context.model_yaml_config``, a real ``ts.context.Context`` with a metrics cache built from
deploy/metrics.yaml), and ``Service.predict`` runs batches encoded as the frontend sends them. The
binary reply is decoded back into per-request status, content type and body, and the metric lines
the worker logs for the frontend are parsed, so statuses, bodies and metrics are what TorchServe
would really serve.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

pytest.importorskip("ts")

from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.model_loader import TsModelLoader  # noqa: E402

from guard import Guard, Profile, load_model  # noqa: E402
from guard._assets import deploy_file  # noqa: E402
from guard.data import load_npz  # noqa: E402
from guard.errors import ProfileError, ProfileMismatch  # noqa: E402
from guard.torchserve.archive import make_archive  # noqa: E402

METRICS_YAML = deploy_file("metrics.yaml")
NAME = "demo"
METRIC_LINE = re.compile(r"\[METRICS\](\w+)\.([^:]*):([^|]+)\|#([^|]*)\|#type:(\w+)")


# ---------------------------------------------------------------- TorchServe wire helpers


def ts_request(req_id: str, body: bytes, content_type: str | None) -> dict:
    """One request as the worker receives it (JSON bodies arrive parsed, like otf_message_handler does)."""
    value: object = body
    if content_type == "application/json":
        try:
            value = json.loads(body.decode("utf-8"))
        except Exception:
            value = body
    headers = [{"name": b"Content-Length", "value": str(len(body)).encode()}]
    if content_type:
        headers.append({"name": b"Content-Type", "value": content_type.encode()})
    return {"requestId": req_id.encode(), "headers": headers,
            "parameters": [{"name": "body", "contentType": content_type or "", "value": value}]}


def decode_reply(msg: bytes) -> list[dict]:
    """Inverse of ts.protocol.otf_message_handler.create_predict_response."""
    pos = 0

    def i32() -> int:
        nonlocal pos
        (v,) = struct.unpack_from("!i", msg, pos)
        pos += 4
        return v

    def buf() -> bytes:
        nonlocal pos
        n = i32()
        out = msg[pos:pos + n]
        pos += n
        return out

    batch_code, _message = i32(), buf()
    replies = []
    while True:
        n = i32()
        if n == -1:
            break
        req_id = msg[pos:pos + n].decode()
        pos += n
        ctype = buf().decode()
        status = i32()
        phrase = buf().decode()
        headers = {buf().decode(): buf().decode() for _ in range(i32())}
        body = buf()
        replies.append({"id": req_id, "batch_code": batch_code, "status": status, "phrase": phrase,
                        "content_type": ctype, "headers": headers, "body": json.loads(body)})
    return replies


def png(x_chw: np.ndarray) -> bytes:
    arr = np.rint(x_chw * 255).astype(np.uint8).transpose(1, 2, 0)
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def metric_lines(caplog) -> list[dict]:
    out = []
    for rec in caplog.records:
        m = METRIC_LINE.search(rec.getMessage())
        if m and m.group(1).startswith("guard_"):
            dims = dict(kv.split(":", 1) for kv in m.group(4).split(",") if kv)
            out.append({"name": m.group(1), "unit": m.group(2), "value": float(m.group(3)), "dims": dims,
                        "type": m.group(5)})
    return out


def counts(lines: list[dict], name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in lines:
        if m["name"] == name:
            out[m["dims"][label]] = out.get(m["dims"][label], 0) + m["value"]
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def unpacked(demo_world, demo_profile, tmp_path_factory) -> Path:
    """The demo .mar from guard archive's code, unpacked as TorchServe unpacks it."""
    export = tmp_path_factory.mktemp("mar")
    mar, _ = make_archive(name=NAME, model_file=demo_world.model_file, weights=demo_world.weights,
                          profile=demo_profile, export_path=export, mode="enforce", batch_size=8)
    base = tmp_path_factory.mktemp("unpacked") / NAME
    with zipfile.ZipFile(mar) as z:
        z.extractall(base)
    return base


@pytest.fixture(scope="module")
def data(demo_world, demo_profile):
    """Held-out clean images the offline guard passes and triggered ones it rejects, with its decisions."""
    model = load_model(demo_world.model_file, demo_world.weights)
    guard = Guard(model, Profile.load(demo_profile), mode="enforce")
    xh, _ = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    dh, dt = guard.predict(xh[:64]), guard.predict(xt[:64])
    clean = xh[:64][[d.verdict == "pass" for d in dh]]
    trig = xt[:64][[d.verdict == "rejected" for d in dt]]
    assert len(clean) >= 50 and len(trig) >= 50, "fixture guard does not separate clean from triggered"
    return {"clean": clean, "triggered": trig, "guard": guard}


def variant(unpacked: Path, tmp_path: Path, **handler_cfg) -> Path:
    """A copy of the unpacked archive with the model-config handler section changed."""
    d = tmp_path / f"{NAME}-variant"
    shutil.copytree(unpacked, d)
    cfg_path = d / "model-config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["handler"].update(handler_cfg)
    cfg_path.write_text(yaml.safe_dump(cfg))
    return d


def load_service(model_dir: Path, monkeypatch):
    """Load the handler the way a TorchServe worker does (model_dir on sys.path, metrics from deploy/)."""
    monkeypatch.syspath_prepend(str(model_dir))
    sys.modules.pop("guarded_handler", None)
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    metrics.model_name = NAME
    try:
        service = TsModelLoader().load(NAME, str(model_dir), handler="guarded_handler.py", gpu_id=None,
                                       batch_size=8, metrics_cache=metrics)
    finally:
        sys.modules.pop("guarded_handler", None)
    service.set_cl_socket(None)
    return service


def predict(service, requests: list[dict]) -> list[dict]:
    return decode_reply(bytes(service.predict(requests)))


@pytest.fixture
def service(unpacked, monkeypatch):
    return load_service(unpacked, monkeypatch)


def as_json(x: np.ndarray) -> bytes:
    return json.dumps({"instances": x.tolist()}).encode()


# ---------------------------------------------------------------- tests


def test_handler_reads_its_config_from_the_archive(service):
    handler = service._entry_point.__self__
    assert type(handler).__name__ == "GuardedHandler"
    assert handler.service.guard.mode == "enforce" and handler.service.fail_open is False
    assert handler.service.max_request_bytes == 1_048_576  # guard archive's default (1 MiB)
    assert service.context.model_yaml_config["batchSize"] == 8


def test_mixed_batch_each_request_gets_its_own_status_and_metrics(service, data, caplog):
    c, t = data["clean"], data["triggered"]
    requests = [
        ts_request("clean-json", as_json(c[:1]), "application/json"),
        ts_request("malformed", b'{"instances": [[0.5, 2.0]]}', "application/json"),
        ts_request("triggered-json", as_json(t[:1]), "application/json"),
        ts_request("clean-png", png(c[1]), "image/png"),
        ts_request("not-json", b'{"instances": ', "application/json"),
        ts_request("multi", as_json(np.concatenate([c[2:4], t[1:2]])), "application/json"),
        ts_request("sniffed-png", png(t[2]), None),
        ts_request("out-of-range", as_json(c[:1] * 3), "application/json"),
    ]
    with caplog.at_level(logging.INFO):
        replies = predict(service, requests)
    by = {r["id"]: r for r in replies}
    assert [r["id"] for r in replies] == [q["requestId"].decode() for q in requests]
    assert {k: v["status"] for k, v in by.items()} == {
        "clean-json": 200, "malformed": 400, "triggered-json": 403, "clean-png": 200, "not-json": 400,
        "multi": 200, "sniffed-png": 403, "out-of-range": 400}
    assert all(r["batch_code"] == 200 and r["content_type"] == "application/json" for r in replies)
    assert by["triggered-json"]["phrase"] == "Forbidden" and by["malformed"]["phrase"] == "Bad Request"

    # bad requests: {"error": ...} naming the problem
    assert set(by["malformed"]["body"]) == {"error"} and "3x32x32" in by["malformed"]["body"]["error"]
    assert "not valid JSON" in by["not-json"]["body"]["error"]
    assert "[0, 1]" in by["out-of-range"]["body"]["error"]

    # answers: the contract's fields, the same decisions as the offline guard
    fields = {"label", "probabilities", "verdict", "reasons", "scores"}
    for rid in ("clean-json", "triggered-json", "clean-png", "multi", "sniffed-png"):
        for p in by[rid]["body"]["predictions"]:
            assert set(p) == fields
    (ok,) = by["clean-json"]["body"]["predictions"]
    offline = data["guard"].predict(c[:1])[0].to_dict()
    keys = ("label", "verdict", "reasons")
    assert {k: ok[k] for k in keys} == {k: offline[k] for k in keys}
    assert ok["probabilities"] == pytest.approx(offline["probabilities"], abs=1e-4)
    assert ok["scores"] == pytest.approx(offline["scores"], rel=1e-3, abs=1e-3)
    assert ok["verdict"] == "pass" and len(ok["probabilities"]) == 10 and ok["reasons"] == []
    (rej,) = by["triggered-json"]["body"]["predictions"]
    assert rej["verdict"] == "rejected" and rej["label"] is None and rej["probabilities"] is None and rej["reasons"]
    multi = by["multi"]["body"]["predictions"]
    assert [p["verdict"] for p in multi] == ["pass", "pass", "rejected"]  # several instances: 200, per-item verdicts
    assert by["clean-png"]["body"]["predictions"][0]["verdict"] == "pass"

    lines = metric_lines(caplog)
    assert not [r for r in caplog.records if "Failed to update metric" in r.getMessage()]
    assert counts(lines, "guard_requests_total", "verdict") == {"pass": 4, "rejected": 3, "error": 3}
    reasons = counts(lines, "guard_rejections_total", "reason")
    expected: dict[str, float] = {}
    for rid in ("triggered-json", "multi", "sniffed-png"):
        for p in by[rid]["body"]["predictions"]:
            if p["verdict"] == "rejected":  # one count per rejected input, under its main reason
                expected[p["reasons"][0]] = expected.get(p["reasons"][0], 0) + 1
    assert reasons == expected and sum(reasons.values()) == 3
    for m in lines:  # guard's label first, then what TorchServe appends, as deploy/metrics.yaml declares
        assert m["dims"]["ModelName"] == NAME and m["dims"]["Level"] == "Model"
        assert all("," not in v and ":" not in v for v in m["dims"].values())
    latency = [m for m in lines if m["name"] == "guard_latency_seconds"]
    assert len(latency) == 1 and latency[0]["type"] == "HISTOGRAM" and latency[0]["unit"] in ("s", "Seconds")
    assert 0 < latency[0]["value"] < 10


def test_a_batch_of_only_bad_requests_never_reaches_the_guard(service, caplog):
    with caplog.at_level(logging.INFO):
        replies = predict(service, [ts_request("a", b"", "application/json"),
                                    ts_request("b", b"<xml/>", "application/xml")])
    assert [r["status"] for r in replies] == [400, 400]
    assert "unsupported Content-Type" in replies[1]["body"]["error"]
    lines = metric_lines(caplog)
    assert counts(lines, "guard_requests_total", "verdict") == {"error": 2}
    assert not [m for m in lines if m["name"] == "guard_latency_seconds"]


def test_shadow_mode_answers_flagged_with_the_models_label_and_counts_reasons(unpacked, tmp_path, monkeypatch,
                                                                                data, caplog):
    service = load_service(variant(unpacked, tmp_path, mode="shadow"), monkeypatch)
    with caplog.at_level(logging.INFO):
        (reply,) = predict(service, [ts_request("t", as_json(data["triggered"][:1]), "application/json")])
    assert reply["status"] == 200
    (p,) = reply["body"]["predictions"]
    assert p["verdict"] == "flagged" and p["label"] == 6 and p["reasons"]  # the backdoor's target, served
    lines = metric_lines(caplog)
    assert counts(lines, "guard_requests_total", "verdict") == {"flagged": 1}
    assert counts(lines, "guard_rejections_total", "reason") == {p["reasons"][0]: 1}


def test_request_above_max_request_bytes_answers_413(unpacked, tmp_path, monkeypatch, data):
    service = load_service(variant(unpacked, tmp_path, max_request_bytes=50_000), monkeypatch)
    big, small = as_json(data["clean"][:2]), png(data["clean"][0])
    assert len(big) > 50_000 > len(small)
    replies = predict(service, [ts_request("big", big, "application/json"),
                                ts_request("small", small, "image/png")])
    assert [r["status"] for r in replies] == [413, 200]
    assert replies[0]["phrase"] == "Payload Too Large" and "50000" in replies[0]["body"]["error"]


def _break_guard(service, monkeypatch):
    handler = service._entry_point.__self__

    def boom(x):
        raise RuntimeError("check exploded")

    monkeypatch.setattr(handler.service.guard, "run", boom)


def test_guard_failure_fails_closed_by_default(service, data, monkeypatch, caplog):
    _break_guard(service, monkeypatch)
    with caplog.at_level(logging.INFO):
        replies = predict(service, [ts_request("a", as_json(data["clean"][:1]), "application/json"),
                                    ts_request("b", b"{}", "application/json")])
    assert [r["status"] for r in replies] == [503, 400]
    assert "not answering unguarded" in replies[0]["body"]["error"] and "predictions" not in replies[0]["body"]
    assert counts(metric_lines(caplog), "guard_requests_total", "verdict") == {"error": 2}


def test_guard_failure_with_fail_open_answers_the_bare_model_marked_error(unpacked, tmp_path, monkeypatch, data):
    service = load_service(variant(unpacked, tmp_path, fail_open=True), monkeypatch)
    _break_guard(service, monkeypatch)
    (reply,) = predict(service, [ts_request("a", as_json(data["triggered"][:1]), "application/json")])
    assert reply["status"] == 200
    (p,) = reply["body"]["predictions"]
    assert p["verdict"] == "error" and p["reasons"] == ["guard_error"] and p["label"] == 6


# ---------------------------------------------------------------- refusing to load


def _refuses(model_dir: Path, monkeypatch, caplog, error: type) -> str:
    with caplog.at_level(logging.ERROR), pytest.raises(error):
        load_service(model_dir, monkeypatch)
    lines = [r.getMessage() for r in caplog.records if "GUARD REFUSED TO LOAD" in r.getMessage()]
    assert len(lines) == 1
    return lines[0]


def test_refuses_a_profile_built_for_another_model(unpacked, tmp_path, monkeypatch, caplog):
    d = variant(unpacked, tmp_path)
    state = torch.load(d / "weights.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 1e-3  # a retrained / swapped model
    torch.save(state, d / "weights.pt")
    line = _refuses(d, monkeypatch, caplog, ProfileMismatch)
    assert "another model" in line or "built for model" in line


def test_refuses_a_truncated_profile(unpacked, tmp_path, monkeypatch, caplog):
    d = variant(unpacked, tmp_path)
    t = d / "guard-profile" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    assert "truncated" in _refuses(d, monkeypatch, caplog, ProfileError)


def test_refuses_a_missing_profile(unpacked, tmp_path, monkeypatch, caplog):
    d = variant(unpacked, tmp_path)
    shutil.rmtree(d / "guard-profile")
    assert "not found" in _refuses(d, monkeypatch, caplog, ProfileError)


def test_refuses_an_unknown_mode(unpacked, tmp_path, monkeypatch, caplog):
    _refuses(variant(unpacked, tmp_path, mode="yolo"), monkeypatch, caplog, Exception)


def test_a_profile_with_the_trajectory_check_is_served_with_its_reason(demo_world, demo_profile, data, tmp_path,
                                                                        monkeypatch):
    """``guard scan --trajectory``'s section travels in the archive and the handler's guard uses it: a triggered
    request is refused with the check's score in its answer, a clean one passes."""
    from guard.online.trajectory import Trajectory

    model = load_model(demo_world.model_file, demo_world.weights)
    profile = Profile.load(demo_profile)
    xc, yc = load_npz(demo_world.clean)
    traj = Trajectory().fit(model, xc[:300], yc[:300]).infer_threshold(xc[300:], fpr=profile.fpr / 2)
    profile.set_trajectory(*traj.to_profile())
    profile.save(tmp_path / "profile")
    mar, _ = make_archive(name=NAME, model_file=demo_world.model_file, weights=demo_world.weights,
                          profile=tmp_path / "profile", export_path=tmp_path, mode="enforce", batch_size=8)
    with zipfile.ZipFile(mar) as z:
        z.extractall(tmp_path / NAME)
    service = load_service(tmp_path / NAME, monkeypatch)
    assert service._entry_point.__self__.service.guard.trajectory is not None
    clean, trig = predict(service, [ts_request("c", as_json(data["clean"][:1]), "application/json"),
                                    ts_request("t", as_json(data["triggered"][:1]), "application/json")])
    assert clean["status"] == 200 and trig["status"] == 403
    (p,) = clean["body"]["predictions"]
    assert "trajectory" in p["scores"] and p["verdict"] == "pass"
