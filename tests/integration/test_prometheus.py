"""The monitoring path end to end: the guarded demo on a real TorchServe, scraped by a real Prometheus.

``guard archive`` + ``guard serve --ports auto`` start the guarded demo model (enforce mode, token auth
on) on free 127.0.0.1 ports; Prometheus (``/usr/bin/prometheus``; Debian's ``prometheus`` package is
installed with apt-get when missing and we are root) runs on another free loopback port with the
shipped deploy/prometheus/prometheus.yml: its target ``torchserve:8082`` replaced by the real metrics
port, scrape and evaluation every second, and the shipped deploy/prometheus/alerts.yml as its rule
file. A known number of single-image requests (clean and triggered) is sent in two phases, and what
each client was told (verdict, reasons) is recorded. Checked through Prometheus's HTTP API:

* the target is up and every shipped rule loaded and evaluates without error on the real series;
* ``sum by (verdict) (guard_requests_total)`` equals the verdicts the clients got, per verdict;
* ``sum(guard_rejections_total)`` equals the rejected answers, and ``sum by (reason)`` their main
  reasons: guard counts each rejected instance once, under the first (strongest) of the reasons the
  client was told (guard/metrics.py ``count_decisions``);
* one ``guard_latency_seconds`` observation per batch (batch size 1: one per request);
* the dashboard's model variable resolves to the served model, and GuardHighRejectionRate goes
  pending on this traffic (a third rejected) while GuardErrors and GuardEndpointDown stay quiet;
* every metric name the Grafana dashboard and the alert rules query is served by the guarded metrics
  port (guard_* names with samples) or provided by Prometheus itself (``up``), and is in Prometheus.

Both servers are stopped in the fixtures' teardown whatever happened (TorchServe by ``guard stop``
and its process group; Prometheus by pid: SIGTERM, bounded wait, SIGKILL). Every wait is bounded in
count and time; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prom_helpers import install_prometheus_with_apt, queried_names, served_names
from serve_helpers import guard_cli, guard_serve

from guard.bench import load
from guard.data import load_npz
from guard.serving.metrics import label_value
from guard.torchserve.client import http
from guard.torchserve.ports import free_ports
from guard.torchserve.supervision import Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "guard.json"
NAME = "demo"
N_CLEAN, N_TRIGGERED = 20, 10  # single-image requests, sent in two phases of half each
SHIPPED_TARGET = "torchserve:8082"
GUARD_SERIES = ("guard_requests_total", "guard_rejections_total", "guard_latency_seconds_bucket",
                "guard_latency_seconds_count", "guard_latency_seconds_sum")



def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], *, seconds: float, interval: float = 0.5) -> Any:
    """``fetch()`` until ``done`` holds or ``seconds`` passed (bounded in count too); the last value."""
    deadline = time.monotonic() + seconds
    value = fetch()
    for _ in range(int(seconds / interval) + 1):
        if done(value) or time.monotonic() > deadline:
            break
        time.sleep(interval)
        value = fetch()
    return value


# ---------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen
    log: Path
    config: Path

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        status, raw = http(url, timeout=10)
        assert status == 200, (url, status, raw[:500])
        body = json.loads(raw)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        why = install_prometheus_with_apt()
        found = shutil.which("prometheus")
        if found is None:
            pytest.fail("prometheus is not installed and could not be installed: "
                        f"{why or 'apt-get install prometheus left no prometheus on PATH'}")
    return found


def scrape_config(metrics_port: int) -> dict:
    """deploy/prometheus/prometheus.yml as shipped, but: the real metrics port, 1 s intervals and the
    shipped alerts.yml by absolute path."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"], config["rule_files"]
    config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "torchserve" and job["metrics_path"] == "/metrics", job
    (static,) = job["static_configs"]
    assert static["targets"] == [SHIPPED_TARGET], static
    static["targets"] = [f"127.0.0.1:{metrics_port}"]
    return config


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM the process by pid, wait (bounded), then SIGKILL and reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server(demo_world, demo_profile, tmp_path_factory):
    """The guarded demo archive served by ``guard serve --ports auto`` (enforce mode, batch size 1)."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    store = tmp_path_factory.mktemp("prom-store")
    done = guard_cli("archive", "--name", NAME, "--model-file", str(demo_world.model_file),
                     "--weights", str(demo_world.weights), "--profile", str(demo_profile),
                     "--export-path", str(store), "--mode", "enforce", "--batch-size", "1")
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path_factory.mktemp("prom-serve")
    with guard_serve(store, run_dir, "--models", f"{NAME}={NAME}.mar") as (srv, _):
        yield srv


@pytest.fixture(scope="module")
def prometheus(server, prometheus_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(urllib.parse.urlsplit(server.urls["metrics"]).port)))
    (port,) = free_ports(1)
    log = work / "prometheus.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log, config)
    try:
        def ready() -> bool:
            try:
                return http(f"{prom.url}/-/ready", timeout=2)[0] == 200
            except OSError:
                return False

        if not poll(ready, lambda ok: ok or proc.poll() is not None, seconds=60):
            pytest.fail(f"Prometheus did not get ready (exit code {proc.poll()}):\n{prom.log_tail()}")
        yield prom
        stop_process(proc)
        assert proc.returncode == 0, f"Prometheus exited with {proc.returncode}:\n{prom.log_tail()}"
    finally:
        stop_process(proc)


@dataclass
class Answer:
    kind: str
    status: int
    verdict: str
    reasons: list[str]


def _send(srv: Server, kind: str, x) -> Answer:
    status, raw, error = load.post_once(f"{srv.urls['inference']}/predictions/{NAME}", load.json_body(x[None]),
                                        key=srv.key("inference"), timeout_s=60)
    assert error is None and status in (200, 403), (kind, status, error, raw[:500])
    (pred,) = json.loads(raw)["predictions"]
    return Answer(kind, status, pred["verdict"], list(pred["reasons"]))


@pytest.fixture(scope="module")
def traffic(server, prometheus, demo_world) -> list[Answer]:
    """N_CLEAN clean and N_TRIGGERED triggered single-image requests, what each client was told.

    Sent in two phases, the second only once Prometheus has scraped the first, so the counters rise
    between scrapes and the rate-based rules have something to compute.
    """
    up = poll(lambda: prometheus.scalar('up{job="torchserve"}'), lambda v: v == 1, seconds=30)
    assert up == 1, f"Prometheus does not scrape {server.urls['metrics']}: up={up}\n{prometheus.log_tail()}"
    xc, _ = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    assert len(xc) >= N_CLEAN and len(xt) >= N_TRIGGERED
    half_c, half_t = N_CLEAN // 2, N_TRIGGERED // 2
    answers: list[Answer] = []
    for phase, (clean, triggered) in enumerate(((xc[:half_c], xt[:half_t]),
                                                (xc[half_c:N_CLEAN], xt[half_t:N_TRIGGERED]))):
        mine = [_send(server, "clean", x) for x in clean] + [_send(server, "triggered", x) for x in triggered]
        assert any(a.verdict == "rejected" for a in mine), f"phase {phase}: nothing rejected: {mine}"
        answers += mine
        seen = poll(lambda: prometheus.scalar("sum(guard_requests_total)"), lambda v, n=len(answers): v == n,
                    seconds=60)
        assert seen == len(answers), f"phase {phase}: Prometheus counts {seen} requests, {len(answers)} were sent"
    return answers


# ---------------------------------------------------------------- tests


def test_prometheus_scrapes_the_guarded_metrics_port(prometheus, server, traffic):
    assert prometheus.scalar('up{job="torchserve"}') == 1
    (target,) = prometheus.get("/api/v1/targets", state="active")["activeTargets"]
    assert target["scrapeUrl"] == f"{server.urls['metrics']}/metrics"
    assert target["health"] == "up" and target["labels"]["job"] == "torchserve", target


def test_the_shipped_rules_load_and_evaluate_without_error(prometheus, traffic):
    shipped = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    expected = {g["name"]: [r.get("record") or r.get("alert") for r in g["rules"]] for g in shipped["groups"]}

    def evaluated(groups) -> bool:
        return all(r["health"] != "unknown" for g in groups for r in g["rules"])

    groups = poll(lambda: prometheus.get("/api/v1/rules")["groups"], evaluated, seconds=30)
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in groups} == expected
    assert all(Path(g["file"]) == PROM_DIR / "alerts.yml" for g in groups)
    broken = {r["name"]: (r["health"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"}
    assert broken == {}


def test_request_and_rejection_counters_equal_what_the_clients_were_told(prometheus, traffic):
    assert len(traffic) == N_CLEAN + N_TRIGGERED
    verdicts = Counter(a.verdict for a in traffic)
    assert all((a.status == 403) == (a.verdict == "rejected") for a in traffic)  # single images: 403 = rejected
    assert verdicts["pass"] > 0 and verdicts["rejected"] > 0 and verdicts["error"] == 0, verdicts
    reasons = Counter(label_value(a.reasons[0] if a.reasons else "unknown") for a in traffic
                      if a.verdict in ("rejected", "flagged"))

    assert prometheus.scalar("sum(guard_requests_total)") == len(traffic)
    assert prometheus.by("sum by (verdict) (guard_requests_total)", "verdict") == dict(verdicts)
    assert prometheus.by("sum by (reason) (guard_rejections_total)", "reason") == dict(reasons)
    rejections = prometheus.scalar("sum(guard_rejections_total)")
    assert rejections == verdicts["rejected"] == sum(reasons.values())  # one per rejected answer
    # guard_latency_seconds observes a sample of the batches (at most ten per second of traffic; the first one
    # always): batch size 1, so between one and one per request
    count = poll(lambda: prometheus.scalar("sum(guard_latency_seconds_count)"), lambda v: v >= 1, seconds=30)
    assert 1 <= count <= len(traffic)
    # every series carries TorchServe's model labels, as the dashboard and the rules group by them
    for name in ("guard_requests_total", "guard_rejections_total", "guard_latency_seconds_count"):
        labels = [r["metric"] for r in prometheus.query(name)]
        assert labels and all(m["ModelName"] == NAME and m["Level"] == "Model" for m in labels), labels


def test_dashboard_variable_and_alert_rules_work_on_the_real_series(prometheus, traffic):
    assert prometheus.get("/api/v1/label/ModelName/values", **{"match[]": "guard_requests_total"}) == [NAME]
    ratio = poll(lambda: prometheus.by("guard:rejection_ratio:rate5m", "ModelName"),
                 lambda v: v.get(NAME, 0) > 0, seconds=30)
    assert set(ratio) == {NAME} and 0.05 < ratio[NAME] <= 1, ratio

    def alerts() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in prometheus.get("/api/v1/alerts")["alerts"]}

    active = poll(alerts, lambda a: "GuardHighRejectionRate" in a, seconds=30)
    assert active.get("GuardHighRejectionRate") == "pending", active  # `for: 5m` keeps it pending here
    assert "GuardErrors" not in active and "GuardEndpointDown" not in active, active


def test_dashboard_and_alert_rules_query_what_the_guarded_endpoint_serves(prometheus, server, traffic):
    status, raw = http(f"{server.urls['metrics']}/metrics")
    assert status == 200
    text = raw.decode()
    served = served_names(text)
    sampled = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    dashboard = json.loads(DASHBOARD.read_text())
    alert_rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    used = queried_names(dashboard, alert_rules)
    guard_used = {n for n in used if n.startswith("guard_")}
    assert guard_used == set(GUARD_SERIES), sorted(guard_used)
    assert guard_used <= sampled, f"queried guard metrics without samples: {sorted(guard_used - sampled)}"
    assert used - served <= {"up"}, f"queried but neither served nor Prometheus's: {sorted(used - served - {'up'})}"
    assert "up" not in served
    wanted = used & sampled | {"up"}
    missing = poll(lambda: wanted - set(prometheus.get("/api/v1/label/__name__/values")), lambda m: not m,
                   seconds=10)
    assert missing == set(), f"served and queried but not in Prometheus: {sorted(missing)}"
