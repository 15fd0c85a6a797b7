"""The guarded demo model on a real TorchServe behind nginx: `guard archive`, `guard serve --ingress nginx`,
HTTP (TorchServe's /predictions, KServe v1 and the Open Inference Protocol v2), gRPC, metrics, `guard stop`.

TorchServe and nginx run on free 127.0.0.1 ports with token authorization on at the ingress, started and
stopped through the CLI; the fixture's teardown stops their process group whatever happened. gRPC goes to
TorchServe's own gRPC port (on 127.0.0.1; the ingress fronts HTTP only). Every wait is bounded in count and
time.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from grpc_helpers import InferenceClient
from PIL import Image
from serve_helpers import guard_cli, guard_serve, require_nginx

from guard import Guard, Profile, load_model
from guard.data import load_npz
from guard.errors import ProfileMismatch
from guard.torchserve import server as ts
from guard.torchserve.client import guard_metric_lines, http
from guard.torchserve.config import read_properties
from guard.torchserve.supervision import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
NAME = "demo"
MAX_BYTES = 500_000  # below TorchServe's own 6.5 MB bound, so guard's 413 is what answers



def png(x_chw: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.rint(x_chw * 255).astype(np.uint8).transpose(1, 2, 0)).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def archive(demo_world, demo_profile, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    done = guard_cli("archive", "--name", NAME, "--model-file", str(demo_world.model_file),
                     "--weights", str(demo_world.weights), "--profile", str(demo_profile),
                     "--export-path", str(store), "--mode", "enforce", "--batch-size", "4",
                     "--max-batch-delay", "20", "--max-request-bytes", str(MAX_BYTES))
    assert done.returncode == 0, done.stderr
    assert (store / f"{NAME}.mar").is_file()
    return store


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    require_nginx()
    run_dir = tmp_path_factory.mktemp("serve")
    with guard_serve(archive, run_dir, "--models", f"{NAME}={NAME}.mar", "--ingress", "nginx") as (srv, out):
        assert "token auth ON" in out and str(run_dir / "key_file.json") in out
        yield srv


@pytest.fixture(scope="module")
def data(demo_world, demo_profile):
    """Clean held-out images the offline guard passes and triggered ones it rejects."""
    guard = Guard(load_model(demo_world.model_file, demo_world.weights), Profile.load(demo_profile))
    xh, yh = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    keep_h = [d.verdict == "pass" for d in guard.predict(xh[:40])]
    keep_t = [d.verdict == "rejected" for d in guard.predict(xt[:40])]
    return {"clean": xh[:40][keep_h], "clean_y": yh[:40][keep_h], "triggered": xt[:40][keep_t]}


def post(srv: Server, body: bytes, ctype: str | None = "application/json", key: str | None = "inference"):
    status, raw = http(f"{srv.urls['inference']}/predictions/{NAME}", body=body, content_type=ctype,
                          key=srv.key(key) if key else None, timeout=60)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def instances(x: np.ndarray) -> bytes:
    return json.dumps({"instances": x.tolist()}).encode()


def v2_request(x: np.ndarray, **tensor) -> bytes:
    return json.dumps({"id": "r-1", "inputs": [{"name": "input-0", "shape": list(x.shape), "datatype": "FP32",
                                                "data": x.reshape(-1).tolist(), **tensor}]}).encode()


def post_to(srv: Server, path: str, body: bytes):
    status, raw = http(f"{srv.urls['inference']}{path}", body=body, content_type="application/json",
                          key=srv.key("inference"), timeout=60)
    return status, json.loads(raw)


def grpc_predict(srv: Server, body: bytes):
    """(answer body, None) or (None, (grpc status code name, details)) from TorchServe's gRPC API."""
    import grpc

    port = int(read_properties(srv.config)["grpc_inference_port"])
    with InferenceClient(port) as client:
        try:
            return json.loads(client.predict(NAME, {"data": body})), None
        except grpc.RpcError as e:
            return None, (e.code().name, e.details())


@pytest.fixture(scope="module")
def traffic(server, data):
    """Everything the tests check, sent once (metrics are cumulative): answers plus expected counts."""
    c, t = data["clean"], data["triggered"]
    out = {
        "no_token": post(server, instances(c[:1]), key=None),
        "no_token_ping": http(f"{server.urls['inference']}/ping"),
        "ping": http(f"{server.urls['inference']}/ping", key=server.key()),
        "clean": post(server, instances(c[:6])),
        "triggered_single": post(server, instances(t[:1])),
        "triggered_batch": post(server, instances(t[1:4])),
        "png_clean": post(server, png(c[6]), "image/png"),
        "png_triggered": post(server, png(t[4]), "image/png"),
        "malformed": post(server, b'{"instances": [[0.1, 0.2]]}'),
        "not_json": post(server, b"{nope", "application/json"),
        "wrong_size_png": post(server, png(np.zeros((3, 16, 16), np.float32)), "image/png"),
        "too_large": post(server, instances(np.zeros((40, 3, 32, 32), np.float32) + 0.25)),
        "v1_clean": post_to(server, f"/v1/models/{NAME}:predict", instances(c[7:8])),
        "v2_clean": post_to(server, f"/v2/models/{NAME}/infer", v2_request(c[8:10])),
        "v2_triggered": post_to(server, f"/v2/models/{NAME}/infer", v2_request(t[5:6])),
        "v2_malformed": post_to(server, f"/v2/models/{NAME}/infer", v2_request(c[:1], datatype="INT8")),
        "v2_ready": http(f"{server.urls['inference']}/v2/health/ready", key=server.key()),
        "v2_live": http(f"{server.urls['inference']}/v2/health/live", key=server.key()),
        "v2_metadata": http(f"{server.urls['inference']}/v2/models/{NAME}", key=server.key()),
        "v2_no_token": http(f"{server.urls['inference']}/v2/health/ready"),
        "grpc_clean": grpc_predict(server, instances(c[10:11])),
        "grpc_triggered": grpc_predict(server, instances(t[6:7])),
        "grpc_v2": grpc_predict(server, v2_request(c[11:12])),
        "grpc_malformed": grpc_predict(server, b'{"instances": [[0.1, 0.2]]}'),
        "grpc_not_json": grpc_predict(server, b"{nope"),
    }
    return out


def test_requests_without_the_token_are_refused_with_401(traffic):
    status, body = traffic["no_token"]
    assert status == 401 and "InvalidKeyException" in json.dumps(body)  # nginx's 401, not TorchServe's 400
    assert traffic["no_token_ping"][0] == 401
    assert traffic["ping"][0] == 200


def test_clean_json_batch_passes_with_correct_labels(traffic, data):
    status, body = traffic["clean"]
    assert status == 200
    preds = body["predictions"]
    assert [p["verdict"] for p in preds] == ["pass"] * 6
    assert [p["label"] for p in preds] == data["clean_y"][:6].tolist()
    assert all(set(p) == {"label", "probabilities", "verdict", "reasons", "scores"} for p in preds)
    assert all(abs(sum(p["probabilities"]) - 1) < 1e-3 for p in preds)


def test_triggered_single_request_is_refused_403_without_the_hijacked_label(traffic):
    status, body = traffic["triggered_single"]
    assert status == 403
    (p,) = body["predictions"]
    assert p["verdict"] == "rejected" and p["label"] is None and p["probabilities"] is None and p["reasons"]


def test_triggered_batch_answers_200_with_per_instance_verdicts(traffic):
    status, body = traffic["triggered_batch"]
    assert status == 200 and [p["verdict"] for p in body["predictions"]] == ["rejected"] * 3


def test_png_bodies_are_guarded_too(traffic):
    status, body = traffic["png_clean"]
    assert status == 200 and body["predictions"][0]["verdict"] == "pass"
    status, body = traffic["png_triggered"]
    assert status == 403 and body["predictions"][0]["verdict"] == "rejected"


def test_malformed_requests_answer_400_with_an_error_message(traffic):
    for key, words in (("malformed", "3x32x32"), ("not_json", "not valid JSON"), ("wrong_size_png", "32x32")):
        status, body = traffic[key]
        assert status == 400, (key, body)
        assert set(body) == {"error"} and words in body["error"], (key, body)


def test_oversized_request_answers_413(traffic):
    status, body = traffic["too_large"]
    assert status == 413 and str(MAX_BYTES) in body["error"]


def test_kserve_v1_predict_is_the_same_contract(traffic):
    status, body = traffic["v1_clean"]
    assert status == 200 and body["predictions"][0]["verdict"] == "pass"


def _outputs(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def test_v2_infer_answers_in_the_open_inference_protocol_form(traffic, data):
    status, body = traffic["v2_clean"]
    assert status == 200 and body["model_name"] == NAME and body["id"] == "r-1"
    out = _outputs(body)
    assert set(out) == {"label", "probabilities", "verdict", "reasons"}
    assert out["label"]["shape"] == [2] and out["label"]["data"] == data["clean_y"][8:10].tolist()
    assert out["probabilities"]["shape"] == [2, 10] and len(out["probabilities"]["data"]) == 20
    assert out["verdict"]["data"] == ["pass", "pass"] and out["reasons"]["data"] == ["", ""]


def test_v2_triggered_single_instance_is_403_in_the_same_form(traffic):
    status, body = traffic["v2_triggered"]
    assert status == 403 and body["model_name"] == NAME
    out = _outputs(body)
    assert out["verdict"]["data"] == ["rejected"] and out["label"]["data"] == [-1] and out["reasons"]["data"][0]
    assert out["probabilities"]["data"] == [] and out["probabilities"]["shape"] == [1, 0]  # withheld


def test_v2_malformed_is_400_json_and_health_and_metadata_are_what_torchserve_serves(traffic):
    status, body = traffic["v2_malformed"]
    assert status == 400 and set(body) == {"error"} and "FP32" in body["error"]
    assert traffic["v2_ready"][0] == 200 and json.loads(traffic["v2_ready"][1]) == {"ready": True}
    assert traffic["v2_live"][0] == 200 and json.loads(traffic["v2_live"][1]) == {"live": True}
    # TorchServe 0.12 has no v2 model metadata route: a JSON 404 (documented in docs/operations.md)
    assert traffic["v2_metadata"][0] == 404 and json.loads(traffic["v2_metadata"][1])["code"] == 404
    assert traffic["v2_no_token"][0] == 401


def test_grpc_predictions_are_guarded_and_malformed_input_is_a_grpc_error(traffic, server):
    body, err = traffic["grpc_clean"]
    assert err is None and body["predictions"][0]["verdict"] == "pass"
    body, err = traffic["grpc_triggered"]  # TorchServe's gRPC API drops the 403: the body says rejected
    assert err is None and body["predictions"][0]["verdict"] == "rejected" and body["predictions"][0]["label"] is None
    body, err = traffic["grpc_v2"]
    assert err is None and _outputs(body)["verdict"]["data"] == ["pass"]
    for key, words in (("grpc_malformed", "3x32x32"), ("grpc_not_json", "not valid JSON")):
        body, err = traffic[key]
        assert body is None and err[0] == "INVALID_ARGUMENT" and words in err[1], (key, err)
    assert server.model_ready(NAME)  # the worker never crashed: still READY, still the same process group


def _samples(text: str, name: str, label: str) -> dict[str, float]:
    pat = re.compile(rf'^{name}\{{{label}="([^"]*)",ModelName="{NAME}",Level="Model",Hostname="[^"]+",\}} (\S+)$',
                     re.M)
    return {m.group(1): float(m.group(2)) for m in pat.finditer(text)}


def test_metrics_port_serves_guard_counters_and_latency(server, traffic):
    # /predictions, then v1 and v2 (2 + 1 rejected + 1 malformed), then gRPC (clean, triggered, v2, 2 malformed)
    expected_requests = {"pass": 6 + 1 + 1 + 2 + 1 + 1, "rejected": 1 + 3 + 1 + 1 + 1, "error": 4 + 1 + 2}
    refused = ("triggered_single", "triggered_batch", "png_triggered")
    reasons = [p["reasons"] for k in refused for p in traffic[k][1]["predictions"]]
    reasons.append(_outputs(traffic["v2_triggered"][1])["reasons"]["data"][0].split(","))
    reasons.append(traffic["grpc_triggered"][0]["predictions"][0]["reasons"])
    expected_reasons: dict[str, float] = {}
    for r in reasons:  # one count per rejected input, under its main (first) reason
        expected_reasons[r[0]] = expected_reasons.get(r[0], 0) + 1
    text, requests = "", {}
    deadline = time.monotonic() + 30
    for _ in range(60):  # the frontend picks metric lines up from the worker log asynchronously
        status, raw = http(f"{server.urls['metrics']}/metrics")  # no token needed on the metrics port
        assert status == 200
        text = raw.decode()
        requests = _samples(text, "guard_requests_total", "verdict")
        if requests == expected_requests or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert requests == expected_requests, text
    assert _samples(text, "guard_rejections_total", "reason") == expected_reasons
    # the requests without a token were answered 401 by nginx: they never reached the handler's counters
    assert "# TYPE guard_latency_seconds histogram" in text
    count = re.search(rf'^guard_latency_seconds_count\{{ModelName="{NAME}",Level="Model",Hostname="[^"]+",\}} (\S+)$',
                      text, re.M)
    assert count and float(count.group(1)) >= 1
    for line in guard_metric_lines(text):
        for value in re.findall(r'="([^"]*)"', line):
            assert "," not in value and ":" not in value


def test_a_second_serve_from_the_same_run_dir_is_refused(server, archive):
    done = guard_cli("serve", "--model-store", str(archive), "--ports", "auto", "--run-dir", str(server.run_dir),
                     timeout=60)
    assert done.returncode == 2 and "still running" in done.stderr
    assert server.alive()


def test_torchserve_refuses_to_serve_a_model_whose_profile_does_not_match(archive, tmp_path):
    """A tampered archive (weights swapped after archiving): the worker never serves it, serve exits 3."""
    store = tmp_path / "store"
    store.mkdir()
    src = zipfile.ZipFile(archive / f"{NAME}.mar")
    with zipfile.ZipFile(store / "tampered.mar", "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            if item.filename == "weights.pt":
                state = torch.load(io.BytesIO(payload), weights_only=True)
                first = next(iter(state))
                state[first] = state[first] * 1.01
                buf = io.BytesIO()
                torch.save(state, buf)
                payload = buf.getvalue()
            dst.writestr(item, payload)
    run_dir = tmp_path / "run"
    with pytest.raises(ProfileMismatch, match="GUARD REFUSED TO LOAD"):
        ts.start(store, models={"tampered": "tampered.mar"}, run_dir=run_dir, timeout=240)
    assert Server.load(run_dir) is None  # start() stopped what it started and removed the state


def test_serve_without_java_is_one_clear_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(BIN)
    if shutil.which("java", path=env["PATH"]):
        pytest.skip("java is in the venv's bin directory")
    done = subprocess.run([str(BIN / "guard"), "serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Java 17" in done.stderr
