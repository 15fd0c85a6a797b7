"""Fixtures for the deploy/ checks: repository paths, promtool, PromQL metric-name extraction (shared with
tests/integration through tests/prom_helpers.py) and the metric names TorchServe 0.12 really serves
(observed on its metrics port with metrics_mode=prometheus)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prom_helpers import install_prometheus_with_apt, metric_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# guard's handler metrics as declared in deploy/metrics.yaml; the histogram is served as
# _bucket/_count/_sum series.
GUARD_METRICS = frozenset(
    {
        "guard_requests_total",
        "guard_rejections_total",
        "guard_latency_seconds_bucket",
        "guard_latency_seconds_count",
        "guard_latency_seconds_sum",
    }
)

# Names TorchServe 0.12.0 put on GET /metrics (default ts_metrics plus the default model metrics),
# observed in a real run: `# TYPE` lines for all of them, samples once the event happened.
TORCHSERVE_METRICS = frozenset(
    {
        "Requests2XX",
        "Requests4XX",
        "Requests5XX",
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
        "QueueTime",
        "WorkerThreadTime",
        "WorkerLoadTime",
        "CPUUtilization",
        "MemoryUsed",
        "MemoryAvailable",
        "MemoryUtilization",
        "DiskUsage",
        "DiskUtilization",
        "DiskAvailable",
        "GPUMemoryUtilization",
        "GPUMemoryUsed",
        "GPUUtilization",
        "HandlerTime",
        "PredictionTime",
    }
)

# Series Prometheus itself provides for every scrape target.
PROMETHEUS_METRICS = frozenset({"up"})

@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def deploy() -> Path:
    assert DEPLOY.is_dir(), "deploy/ is missing"
    return DEPLOY


@pytest.fixture(scope="session")
def promql_names():
    return metric_names


@pytest.fixture(scope="session")
def known_metrics() -> frozenset[str]:
    return GUARD_METRICS | TORCHSERVE_METRICS | PROMETHEUS_METRICS


@pytest.fixture(scope="session")
def alert_rules(deploy) -> dict:
    return yaml.safe_load((deploy / "prometheus" / "alerts.yml").read_text())


@pytest.fixture(scope="session")
def dashboard(deploy) -> dict:
    import json

    return json.loads((deploy / "grafana" / "dashboards" / "guard.json").read_text())


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


@pytest.fixture(scope="session")
def properties():
    return read_properties


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool; installs Debian's prometheus package when missing and allowed.

    Skips only where installing is impossible (no apt, not root) and GUARD_REQUIRE_PROMTOOL is unset;
    a failed installation fails.
    """
    found = shutil.which("promtool")
    if found is None:
        why = install_prometheus_with_apt()
        found = shutil.which("promtool")
        if found is None:
            message = f"promtool not found: {why or 'the prometheus package installed no promtool'}"
            if why is None or os.environ.get("GUARD_REQUIRE_PROMTOOL"):
                pytest.fail(message)
            pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def run_promtool(promtool):
    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=300)

    return run
