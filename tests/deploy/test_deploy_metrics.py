"""Metric names used by the dashboard and the alert rules, and the TorchServe metrics config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from prom_helpers import dashboard_exprs
from prom_helpers import rules as rule_list


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (verdict) (rate(guard_requests_total{ModelName=~"$model"}[$__rate_interval]))',
         {"guard_requests_total"}),
        ("histogram_quantile(0.95, sum by (ModelName, le) (rate(guard_latency_seconds_bucket[5m])))",
         {"guard_latency_seconds_bucket"}),
        ('up{job="torchserve"} == 0 or absent(up{job="torchserve"})', {"up"}),
        ("a:b:c / ignoring (reason) group_left sum(rate(x_total[1h] offset 10m)) > scalar(cfg)",
         {"a:b:c", "x_total", "cfg"}),
        ("rate(Requests5XX[5m]) > 0.01 unless on (job) foo_bar", {"Requests5XX", "foo_bar"}),
    ],
)
def test_metric_name_extraction(promql_names, expr, names):
    assert promql_names(expr) == names


def test_dashboard_uses_only_known_metrics(dashboard, promql_names, known_metrics):
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    used = set().union(*(promql_names(e) for e in exprs))
    assert used - known_metrics == set(), f"dashboard uses unknown metrics: {sorted(used - known_metrics)}"
    for name in ("guard_requests_total", "guard_rejections_total", "guard_latency_seconds_bucket", "up"):
        assert name in used, f"dashboard does not show {name}"


def test_alert_rules_use_only_known_metrics(alert_rules, promql_names, known_metrics):
    rules = rule_list(alert_rules)
    recorded = {rule["record"] for rule in rules if "record" in rule}
    used = set().union(*(promql_names(rule["expr"]) for rule in rules))
    unknown = used - known_metrics - recorded
    assert unknown == set(), f"alert rules use unknown metrics: {sorted(unknown)}"
    # every recording rule is used by something
    assert recorded - used == set(), f"unused recording rules: {sorted(recorded - used)}"
    assert {"guard_requests_total", "guard_rejections_total", "guard_latency_seconds_bucket", "up",
            "Requests5XX"} <= used


def test_dashboard_datasource_matches_provisioning(deploy, dashboard):
    provisioned = yaml.safe_load(
        (deploy / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {ds["uid"] for ds in provisioned["datasources"]}
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in uids, panel["title"]
    assert dashboard["uid"] and dashboard["title"]


@pytest.fixture(scope="session")
def metrics_config(deploy) -> dict:
    return yaml.safe_load((deploy / "metrics.yaml").read_text())


def _declared(section: dict) -> dict[str, tuple[str, list[str]]]:
    return {m["name"]: (kind, m["dimensions"]) for kind, items in section.items() for m in items}


def test_guard_metrics_declared_as_torchserve_needs(metrics_config):
    """TorchServe appends ModelName then Level to the handler's dimensions: another order mislabels
    the series silently, a shorter list drops every update."""
    declared = _declared(metrics_config["model_metrics"])
    assert declared["guard_requests_total"] == ("counter", ["verdict", "ModelName", "Level"])
    assert declared["guard_rejections_total"] == ("counter", ["reason", "ModelName", "Level"])
    assert declared["guard_latency_seconds"] == ("histogram", ["ModelName", "Level"])
    for name, (_, dims) in declared.items():
        assert dims[-2:] == ["ModelName", "Level"], name


def test_metrics_config_keeps_torchserve_defaults(metrics_config, known_metrics):
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        pytest.skip("torchserve is not installed")
    default = yaml.safe_load((Path(spec.origin).parent / "configs" / "metrics.yaml").read_text())
    assert metrics_config["dimensions"] == default["dimensions"]
    assert metrics_config["ts_metrics"] == default["ts_metrics"]
    ours = _declared(metrics_config["model_metrics"])
    for name, value in _declared(default["model_metrics"]).items():
        assert ours.get(name) == value, f"default model metric {name} lost"
    served = set(_declared(metrics_config["ts_metrics"])) | set(ours)
    histograms = {name for name, (kind, _) in ours.items() if kind == "histogram"}
    parts = ("bucket", "count", "sum")
    expanded = (served - histograms) | {f"{h}_{part}" for h in histograms for part in parts}
    assert expanded <= known_metrics, sorted(expanded - known_metrics)
