"""Helpers shared by the tests that check deploy/'s monitoring against what is really served.

Imported as ``prom_helpers`` (pytest puts tests/ on ``sys.path`` for tests/conftest.py): by
tests/deploy/ (promtool, the probe handler on a real TorchServe) and tests/integration/test_prometheus.py
(the guarded demo on a real TorchServe scraped by a real Prometheus).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
     "bool", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels, keywords and numbers dropped)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    expr = re.sub(r"'(?:\\.|[^'\\])*'", "''", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables
    expr = re.sub(r"\boffset\s+\S+", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_WORDS:
            continue
        names.add(name)
    return names


def served_names(text: str) -> set[str]:
    """Metric names a Prometheus text page serves: every ``# TYPE`` (a histogram as its _bucket/_count/_sum
    series) and every sample line's name."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            parts = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            names.update(name + part for part in parts)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (rows' nested panels too) and the
    metric of each ``label_values(metric, label)`` template variable."""
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query:
            exprs.append(query.replace("label_values(", "").split(",")[0])
    return exprs


def rules(alert_rules: dict) -> list[dict]:
    """The rules (recording and alerting) of a Prometheus rule file, all groups together."""
    return [rule for group in alert_rules["groups"] for rule in group["rules"]]


def queried_names(dashboard: dict, alert_rules: dict) -> set[str]:
    """Metric names the dashboard and the alert rules query, the rules' own recorded series left out."""
    all_rules = rules(alert_rules)
    recorded = {r["record"] for r in all_rules if "record" in r}
    exprs = [r["expr"] for r in all_rules] + dashboard_exprs(dashboard)
    return set().union(*(metric_names(e) for e in exprs)) - recorded


def install_prometheus_with_apt() -> str | None:
    """Install Debian's ``prometheus`` package (prometheus and promtool) where we may (CI runs as root).

    Returns why it could not try (no apt-get, not root), None once it ran; a failed apt-get fails the test.
    """
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "not root, cannot apt-get install prometheus (run: sudo apt-get install -y prometheus)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return None
