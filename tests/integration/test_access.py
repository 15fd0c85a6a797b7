"""Access: ``guard serve --ingress nginx`` checks tokens at the ingress and says where the keys are.

Checked on a real TorchServe behind a real nginx started by ``guard serve --ingress nginx`` (loopback, free
ports; stopped by ``guard stop`` and, whatever happens, by its process group in the fixture's teardown):

* without a token, or with the wrong one, inference, ``/ping`` and management are refused with
  **401** (``WWW-Authenticate: Bearer``, a JSON body naming the key file) by nginx;
* each key works only on its own API (inference key: inference and /ping; management key: management);
* only the metrics port answers without a token;
* the key file is private (mode 0600) and ``guard serve`` prints its path; TorchServe itself listens on
  127.0.0.1 only, with its own token check off (the ingress checks);
* ``guard stop`` stops nginx with TorchServe; without nginx on PATH ``--ingress nginx`` is one line, exit 2.

The config that ``guard serve`` writes is checked without TorchServe: loopback addresses, token
authorization not disabled unless ``--no-auth``, TorchServe's request bound above guard's.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serve_helpers import guard_serve, require_nginx

from guard.bench import load
from guard.data import load_npz
from guard.serving import DEFAULT_MAX_REQUEST_BYTES
from guard.torchserve.archive import make_archive
from guard.torchserve.client import http
from guard.torchserve.config import archive_max_request_bytes, frontend_max_request_size, read_properties, write_config

NAME = "demo"
integration = pytest.mark.integration



@pytest.fixture(scope="module")
def served(demo_world, demo_profile, tmp_path_factory):
    """``guard serve`` of the demo archive; yields (server, serve's stdout)."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    require_nginx()
    store = tmp_path_factory.mktemp("access-store")
    make_archive(name=NAME, model_file=demo_world.model_file, weights=demo_world.weights, profile=demo_profile,
                 export_path=store, mode="enforce")
    run_dir = tmp_path_factory.mktemp("access-run")
    with guard_serve(store, run_dir, "--ingress", "nginx") as served_:
        yield served_
    assert not Path(f"/proc/{served_[0].ingress_pid}").exists()  # guard stop stopped nginx too


@pytest.fixture(scope="module")
def body(demo_world) -> bytes:
    xh, _ = load_npz(demo_world.holdout)
    return load.json_body(xh[:1])


def _invalid_key(status: int, raw: bytes) -> bool:
    return status == 401 and json.loads(raw).get("type") == "InvalidKeyException"


@integration
@pytest.mark.slow
def test_serve_says_token_auth_is_on_and_where_the_key_file_is(served):
    srv, out = served
    assert srv.token_auth and "token auth ON" in out and str(srv.key_file) in out
    assert "without it the answer is 401" in out and "metrics port is open without a token" in out
    assert srv.ingress == "nginx" and "ingress     nginx" in out and srv.ingress_alive()
    keys = json.loads(srv.key_file.read_text())
    assert {"inference", "management"} <= set(keys)
    assert stat.S_IMODE(srv.key_file.stat().st_mode) == 0o600  # private to the user running guard serve
    assert stat.S_IMODE((srv.ingress_dir / "guard.conf").stat().st_mode) == 0o600  # nginx's copy of the keys
    props = read_properties(srv.config)  # TorchServe: loopback only, its own token check off behind nginx
    assert props["disable_token_authorization"] == "true"
    assert all(props[k].startswith("http://127.0.0.1:") for k in
               ("inference_address", "management_address", "metrics_address"))


@integration
@pytest.mark.slow
def test_inference_refuses_without_the_inference_key_with_401_invalid_key(served, body):
    srv, _ = served
    url = f"{srv.urls['inference']}/predictions/{NAME}"
    for key in (None, "wrong-key", srv.key("management")):
        status, raw, _ = load.post_once(url, body, key=key)
        assert _invalid_key(status, raw), (key, status, raw)
        assert b"predictions" not in raw
    status, raw, _ = load.post_once(url, body, key=srv.key("inference"))
    assert status == 200 and json.loads(raw)["predictions"][0]["verdict"] in ("pass", "flagged", "repaired")


@integration
@pytest.mark.slow
def test_401_carries_www_authenticate_and_names_the_key_file(served, body):
    srv, _ = served
    req = urllib.request.Request(f"{srv.urls['inference']}/predictions/{NAME}", data=body,
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"
    assert str(srv.key_file) in json.loads(e.value.read())["error"]  # says where the keys are
    assert len(e.value.headers["X-Request-Id"]) == 32


@integration
@pytest.mark.slow
def test_ping_needs_the_inference_key_too(served):
    srv, _ = served
    assert _invalid_key(*http(f"{srv.urls['inference']}/ping"))
    assert _invalid_key(*http(f"{srv.urls['inference']}/ping", key=srv.key("management")))
    assert http(f"{srv.urls['inference']}/ping", key=srv.key("inference"))[0] == 200


@integration
@pytest.mark.slow
def test_management_refuses_without_the_management_key(served):
    srv, _ = served
    url = f"{srv.urls['management']}/models"
    for key in (None, "wrong-key", srv.key("inference")):
        assert _invalid_key(*http(url, key=key)), key
        assert _invalid_key(*http(f"{url}/{NAME}?min_worker=3", key=key, method="PUT")), key
    status, raw = http(url, key=srv.key("management"))
    assert status == 200 and NAME in {m["modelName"] for m in json.loads(raw)["models"]}
    # registering models stays off even with the key (TorchServe's enable_model_api default)
    status, raw = http(f"{url}?url=https://example.invalid/x.mar", key=srv.key("management"), method="POST")
    assert status != 200 and status < 500, (status, raw)


@integration
@pytest.mark.slow
def test_only_the_metrics_port_answers_without_a_token(served, body):
    srv, _ = served
    load.post_once(f"{srv.urls['inference']}/predictions/{NAME}", body, key=srv.key("inference"))
    status, raw = http(f"{srv.urls['metrics']}/metrics")
    assert status == 200 and b"# TYPE guard_requests_total counter" in raw
    # the same paths on the other ports need the token
    assert _invalid_key(*http(f"{srv.urls['inference']}/metrics"))
    assert _invalid_key(*http(f"{srv.urls['management']}/metrics"))


def test_ingress_nginx_without_nginx_on_path_is_one_line_and_exit_2(tmp_path):
    java = shutil.which("java")
    if java is None:
        pytest.skip("needs java (checked first)")
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": str(bindir), "JAVA_HOME": str(Path(os.path.realpath(java)).parents[1])}
    if shutil.which("nginx", path=env["PATH"]):
        pytest.skip("nginx is in the venv's bin directory")
    done = subprocess.run([str(bindir / "guard"), "serve", "--model-store", str(tmp_path), "--run-dir", str(tmp_path),
                           "--ingress", "nginx"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "apt-get install nginx" in done.stderr


# ---------------------------------------------------------------- the config guard serve writes


def test_serve_config_keeps_token_auth_unless_no_auth_and_bounds_requests_above_guard(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    for auth in (True, False):
        run = tmp_path / f"run-{auth}"
        run.mkdir()
        cfg = write_config(run, model_store=store, load_models="a=a.mar", ports=(18080, 18081, 18082),
                              token_auth=auth, handler_bounds=[1_048_576, 5_000_000])
        props = read_properties(cfg)
        assert props.get("disable_token_authorization") == (None if auth else "true")
        assert all(props[k].startswith("http://127.0.0.1:") for k in
                   ("inference_address", "management_address", "metrics_address"))
        assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
        assert int(props["max_request_size"]) == 10_000_000  # twice the largest handler bound
    assert frontend_max_request_size([1_048_576]) == 6_553_500  # never below TorchServe's default
    assert frontend_max_request_size([1_048_576], configured=9_000_000) == 9_000_000


def test_archive_bound_is_read_back_from_the_mar(demo_world, demo_profile, tmp_path):
    mar, _ = make_archive(name="x", model_file=demo_world.model_file, weights=demo_world.weights,
                          profile=demo_profile, export_path=tmp_path, max_request_bytes=123_456)
    assert archive_max_request_bytes(mar) == 123_456
    (tmp_path / "junk.mar").write_bytes(b"not a zip")
    assert archive_max_request_bytes(tmp_path / "junk.mar") == DEFAULT_MAX_REQUEST_BYTES
