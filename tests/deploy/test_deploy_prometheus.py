"""Prometheus scrape config, alert rules and their promtool unit tests."""

from __future__ import annotations

import shutil

import pytest
import yaml

EXPECTED_ALERTS = {
    "GuardHighRejectionRate",
    "GuardRejectionMixShift",
    "GuardErrors",
    "GuardLatencyHigh",
    "GuardEndpointDown",
}


def _alerts(rules: dict) -> list[dict]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_config(run_promtool, deploy):
    done = run_promtool("check", "config", str(deploy / "prometheus" / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules(run_promtool, deploy):
    done = run_promtool("check", "rules", str(deploy / "prometheus" / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_test_rules(run_promtool, deploy):
    done = run_promtool("test", "rules", "alerts_test.yml", cwd=deploy / "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "alert"),
    [
        ("expr: vector(0.05)", "expr: vector(0.5)", "GuardHighRejectionRate"),
        ('verdict=~"rejected|flagged"', 'verdict="rejected"', "GuardHighRejectionRate"),
        ("expr: vector(0.3)", "expr: vector(0.9)", "GuardRejectionMixShift"),
        ("expr: vector(0.25)", "expr: vector(2)", "GuardLatencyHigh"),
        ("up{job=\"torchserve\"} == 0 or", "up{job=\"torchserve\"} == 2 or", "GuardEndpointDown"),
        ("rate(Requests5XX[5m])) > 0", "rate(Requests5XX[5m])) > 1", "GuardErrors"),
    ],
)
def test_unit_tests_catch_a_broken_rule(run_promtool, deploy, tmp_path, old, new, alert):
    """The promtool tests really assert firing: weakening a rule makes them fail on that alert."""
    work = tmp_path / "prometheus"
    shutil.copytree(deploy / "prometheus", work)
    rules = (work / "alerts.yml").read_text()
    assert rules.count(old) == 1, f"mutation anchor {old!r} not unique in alerts.yml"
    (work / "alerts.yml").write_text(rules.replace(old, new))
    assert run_promtool("check", "rules", str(work / "alerts.yml")).returncode == 0
    done = run_promtool("test", "rules", "alerts_test.yml", cwd=work)
    assert done.returncode != 0, f"alerts_test.yml did not notice: {old!r} -> {new!r}"
    assert f"alertname: {alert}" in done.stdout + done.stderr


def test_every_alert_is_present_annotated_and_labelled(alert_rules):
    alerts = {rule["alert"]: rule for rule in _alerts(alert_rules)}
    assert set(alerts) == EXPECTED_ALERTS
    for name, rule in alerts.items():
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert len(annotations.get(key, "").strip()) > 20, f"{name}: annotation {key} missing or empty"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        assert rule.get("for"), f"{name}: no `for:` (a single bad scrape would page)"


def test_every_alert_has_firing_and_quiet_unit_tests(deploy):
    tests = yaml.safe_load((deploy / "prometheus" / "alerts_test.yml").read_text())
    firing, quiet = set(), set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS, f"no firing test for {EXPECTED_ALERTS - firing}"
    assert quiet == EXPECTED_ALERTS, f"no quiet test for {EXPECTED_ALERTS - quiet}"


def test_rule_files_resolve(deploy):
    prom = deploy / "prometheus"
    for path, doc in ((prom / "prometheus.yml", "rule_files"), (prom / "alerts_test.yml", "rule_files")):
        files = yaml.safe_load(path.read_text())[doc]
        assert files, path
        for name in files:
            assert (path.parent / name).is_file(), f"{path.name}: rule file {name} missing"
