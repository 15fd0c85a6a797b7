"""deploy/config.properties + deploy/metrics.yaml on a real TorchServe (loopback ports, token auth on).

A probe handler makes the same metrics calls as guard's handler, so this checks what the metrics port
really serves (names, labels, types) against what the dashboard and the alert rules query, and runs
deploy/healthcheck.py against the token-protected /ping, including renewal of an expired key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prom_helpers import queried_names, served_names

from guard.torchserve.ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
MODEL = "probe"

PROBE_HANDLER = '''
import json
import time

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes


class ProbeHandler:
    """Counts each request like guard's handler: body {"verdict": ..., "reason": ...}."""

    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        start = time.perf_counter()
        out = []
        for row in data:
            body = row.get("body") or row.get("data")
            body = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
            verdict = body["verdict"]
            context.metrics.add_counter("guard_requests_total", 1, None, [Dimension("verdict", verdict)])
            if body.get("reason"):
                context.metrics.add_counter(
                    "guard_rejections_total", 1, None, [Dimension("reason", body["reason"])])
            out.append({"verdict": verdict})
        context.metrics.add_metric(
            "guard_latency_seconds", time.perf_counter() - start + 0.003, "s", None, [],
            MetricTypes.HISTOGRAM)
        return out
'''


def _get(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory, deploy, properties):
    if shutil.which("java") is None or not (BIN / "torchserve").exists():
        pytest.skip("TorchServe needs java and the torchserve script next to this python")
    work = tmp_path_factory.mktemp("torchserve")
    store = work / "model-store"
    store.mkdir()
    (work / "handler.py").write_text(PROBE_HANDLER)
    subprocess.run(
        [str(BIN / "torch-model-archiver"), "--model-name", MODEL, "--version", "1.0",
         "--handler", str(work / "handler.py"), "--export-path", str(store)],
        check=True, capture_output=True, timeout=120)

    # deploy/config.properties as `guard serve` uses it: same keys, free ports, absolute paths.
    # The extra keys keep parallel TorchServes apart (gRPC ports, worker socket /tmp/.ts.sock.PORT).
    inference, management, metrics, grpc_i, grpc_m, worker = free_ports(6)
    text = (deploy / "config.properties").read_text()
    for old, new in ((":8080", f":{inference}"), (":8081", f":{management}"), (":8082", f":{metrics}")):
        assert old in text
        text = text.replace(old, new)
    text = re.sub(r"(?m)^metrics_config=.*$", f"metrics_config={deploy / 'metrics.yaml'}", text)
    text = re.sub(r"(?m)^model_store=.*$", f"model_store={store}", text)
    text += (f"\ngrpc_inference_port={grpc_i}\ngrpc_management_port={grpc_m}\n"
             f"initial_worker_port={worker}\nload_models={MODEL}.mar\n")
    config = work / "config.properties"
    config.write_text(text)

    log = open(work / "ts.log", "w")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    conf = properties(config)
    urls = {k: conf[f"{k}_address"] for k in ("inference", "management", "metrics")}
    try:
        deadline = time.monotonic() + 180
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            key_file = work / "key_file.json"
            if key_file.exists():
                try:
                    keys = json.loads(key_file.read_text())
                    status, body = _get(f"{urls['management']}/models/{MODEL}", keys["management"]["key"])
                    if status == 200 and '"READY"' in body:
                        ready = True
                        break
                except (OSError, ValueError, KeyError):
                    pass
            time.sleep(1)
        if not ready:
            pytest.fail("TorchServe did not get ready:\n" + (work / "ts.log").read_text()[-3000:])
        before = _get(f"{urls['metrics']}/metrics")[1]
        yield {"work": work, "config": config, "urls": urls, "before": before,
               "keys": lambda: json.loads((work / "key_file.json").read_text())}
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (launcher, JVM, workers), wait until it is gone, then SIGKILL."""
    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    if alive():
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.2)
    if alive():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@pytest.fixture(scope="module")
def after_traffic(torchserve):
    key = torchserve["keys"]()["inference"]["key"]
    url = f"{torchserve['urls']['inference']}/predictions/{MODEL}"
    for body in ({"verdict": "pass"}, {"verdict": "pass"}, {"verdict": "rejected", "reason": "neuron"},
                 {"verdict": "flagged", "reason": "strip"}):
        status, text = _get(url, key, body)
        assert status == 200, text
    deadline = time.monotonic() + 30
    # the frontend picks the worker's metric lines up from its log asynchronously, one line at a time:
    # wait for the last of the four requests' lines (its latency observation), not just the first
    done = re.compile(r'^guard_latency_seconds_count\{[^}]*\} 4\.0$', re.M)
    while True:
        text = _get(f"{torchserve['urls']['metrics']}/metrics")[1]
        if (done.search(text) and 'reason="strip"' in text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_guard_metrics_declared_before_traffic(torchserve):
    before = torchserve["before"]
    assert "# TYPE guard_requests_total counter" in before
    assert "# TYPE guard_rejections_total counter" in before
    assert "# TYPE guard_latency_seconds histogram" in before


def test_guard_metrics_served_with_exact_names_and_labels(after_traffic):
    text = after_traffic
    labels = rf'ModelName="{MODEL}",Level="Model",Hostname="[^"]+",'
    assert re.search(rf'^guard_requests_total\{{verdict="pass",{labels}\}} 2\.0$', text, re.M), text
    assert re.search(rf'^guard_requests_total\{{verdict="rejected",{labels}\}} 1\.0$', text, re.M)
    assert re.search(rf'^guard_rejections_total\{{reason="neuron",{labels}\}} 1\.0$', text, re.M)
    assert re.search(rf'^guard_rejections_total\{{reason="strip",{labels}\}} 1\.0$', text, re.M)
    assert re.search(rf'^guard_latency_seconds_bucket\{{{labels}le="0\.005",\}} ', text, re.M)
    assert re.search(rf'^guard_latency_seconds_count\{{{labels}\}} 4\.0$', text, re.M)
    assert "guard_requests_total_total" not in text


def test_dashboard_and_alerts_query_what_torchserve_serves(after_traffic, dashboard, alert_rules, known_metrics):
    served = served_names(after_traffic)
    used = queried_names(dashboard, alert_rules) - {"up"}
    assert used - served == set(), f"queried but not served: {sorted(used - served)}"
    # the static list the other tests use matches this real run
    assert (served & known_metrics) >= used
    unlisted = sorted(served - known_metrics)
    assert unlisted == [], f"served but not in the known list: {unlisted}"


def test_token_auth_is_on_and_metrics_port_is_open(torchserve):
    status, body = _get(f"{torchserve['urls']['inference']}/ping")
    assert status == 400 and "InvalidKeyException" in body
    assert _get(f"{torchserve['urls']['metrics']}/metrics")[0] == 200


def _healthcheck(torchserve, deploy, key_file: Path) -> int:
    env = {**os.environ, "GUARD_TS_CONFIG": str(torchserve["config"]), "GUARD_TS_KEY_FILE": str(key_file)}
    done = subprocess.run([sys.executable, str(deploy / "healthcheck.py")], env=env, timeout=60,
                          capture_output=True, text=True)
    return done.returncode


def test_healthcheck_sends_the_token_and_renews_an_expired_key(torchserve, deploy):
    key_file = torchserve["work"] / "key_file.json"
    assert _healthcheck(torchserve, deploy, key_file) == 0
    # without a key file it pings without a token, which TorchServe refuses
    assert _healthcheck(torchserve, deploy, torchserve["work"] / "missing.json") == 1
    # an expired (here: wrong) inference key is renewed through the token API with the API key
    keys = torchserve["keys"]()
    stale = "expired0"
    keys["inference"]["key"] = stale
    key_file.write_text(json.dumps(keys))
    assert _healthcheck(torchserve, deploy, key_file) == 0
    renewed = torchserve["keys"]()["inference"]["key"]
    assert renewed != stale
    assert _get(f"{torchserve['urls']['inference']}/ping", renewed)[0] == 200
