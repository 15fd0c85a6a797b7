"""A fleet audit's files: each model's folder (``NAME/report.json``, ``report.html``, ``metrics.prom``, or
``error.json``) and the run's ``summary.json``, ``summary.html`` and ``metrics.prom``.

A model's folder is written whole into a hidden temporary folder and renamed into place, so a reader (or a
driver that stopped half-way) never sees half a model's reports; the summary is written last.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from guard.audit.fleet_result import FleetResult
from guard.audit.report import _atomic_write


def write_model(row: dict[str, Any], out: Path) -> str:
    """Write one row's files into ``out/NAME/`` (replacing an older folder of that name); returns the
    folder's path of its main file (report.json, or error.json for a model that could not be audited)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{row['name']}.", dir=out))
    try:
        if row["verdict"] == "error":
            main = "error.json"
            (tmp / main).write_text(json.dumps({k: row[k] for k in ("name", "verdict", "error", "host", "seconds")},
                                               indent=2) + "\n")
        else:
            main = "report.json"
            (tmp / main).write_text(json.dumps(row["summary"], indent=2, sort_keys=True, default=float) + "\n")
            (tmp / "report.html").write_text(row["html"], encoding="utf-8")
            (tmp / "metrics.prom").write_text(row["metrics"])
        tmp.chmod(0o755)
        target = out / row["name"]
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target / main)


def summary(result: FleetResult) -> dict[str, Any]:
    """The run as one JSON document: counts, the exit code, what ran it, and a row per model."""
    return {"models": len(result.rows), "verdicts": result.counts, "exit_code": result.exit_code,
            "seconds": round(result.seconds, 3), "executor": result.executor,
            "duplicates_dropped": result.duplicates_dropped,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": result.rows}


def write_summary(result: FleetResult, out: Path) -> dict[str, Path]:
    """Write ``summary.json``, ``summary.html`` and ``metrics.prom`` into ``out``; returns their paths."""
    doc = summary(result)
    paths = {"json": out / "summary.json", "html": out / "summary.html", "metrics": out / "metrics.prom"}
    _atomic_write(paths["json"], json.dumps(doc, indent=2, default=float) + "\n")
    _atomic_write(paths["html"], render_summary_html(doc))
    _atomic_write(paths["metrics"], metrics_text(result))
    return paths


def metrics_text(result: FleetResult) -> str:
    """The run for node_exporter's textfile collector: ``guard_fleet_models{verdict}``,
    ``guard_fleet_model_verdict{name,model}`` (1 backdoored, 0 clean, -1 not audited; ``model`` the first 16 hex
    digits of the SHA-256, empty where not audited), ``guard_fleet_model_duration_seconds{name}``,
    ``guard_fleet_duration_seconds`` and ``guard_fleet_last_run_timestamp_seconds``. Each model's own series
    are in its folder's ``metrics.prom``."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    reg = CollectorRegistry()
    models = Gauge("guard_fleet_models", "Models of the last fleet audit by verdict", ["verdict"], registry=reg)
    for verdict, n in result.counts.items():
        models.labels(verdict).set(n)
    verdict = Gauge("guard_fleet_model_verdict", "Audit verdict per model: 1 backdoor suspected, 0 clean, "
                    "-1 not audited (error)", ["name", "model"], registry=reg)
    secs = Gauge("guard_fleet_model_duration_seconds", "Wall-clock seconds of each model's audit on its worker",
                 ["name"], registry=reg)
    for r in result.rows:
        code = {"backdoored": 1, "clean": 0}.get(r["verdict"], -1)
        verdict.labels(r["name"], (r["model_sha256"] or "")[:16]).set(code)
        secs.labels(r["name"]).set(r["seconds"])
    Gauge("guard_fleet_duration_seconds", "Wall-clock seconds of the whole fleet audit", registry=reg).set(
        result.seconds)
    Gauge("guard_fleet_last_run_timestamp_seconds", "Unix time the fleet audit finished", registry=reg
          ).set_to_current_time()
    return generate_latest(reg).decode()


_CSS = ("body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a}table{border-collapse:collapse}"
        "th,td{border:1px solid #e4e7ec;padding:4px 8px;text-align:left}th{background:#f2f4f7}"
        ".backdoored{background:#fef3f2}.error{background:#fffaeb}")
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'none'; base-uri 'none'"


def render_summary_html(doc: dict[str, Any]) -> str:
    """A table of the run, one row per model, each linking to its own report (no script, no fetch)."""
    rows = []
    for r in doc["rows"]:
        page = "error.json" if r["verdict"] == "error" else "report.html"
        link = f'<a href="{html.escape(r["name"] + "/" + page, quote=True)}">{page}</a>' if r.get("report") else ""
        what = (", ".join(map(str, r["suspect_labels"])) or "-") if r["verdict"] != "error" else r["error"]
        rows.append(f'<tr class="{html.escape(r["verdict"])}"><td>{html.escape(r["name"])}</td>'
                    f'<td>{html.escape(r["verdict"])}</td><td>{html.escape(str(what))}</td>'
                    f'<td>{r["seconds"]:.1f}</td><td>{html.escape(r.get("host") or "")}</td>'
                    f'<td>{link}</td></tr>')
    v = doc["verdicts"]
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\"><title>guard fleet audit</title>"
            f"<style>{_CSS}</style></head><body><h1>Fleet audit: {doc['models']} models</h1>"
            f"<p>{v['backdoored']} backdoored, {v['clean']} clean, {v['error']} not audited; exit code "
            f"{doc['exit_code']}; {doc['seconds']:.1f} s on {html.escape(str(doc['executor'].get('kind')))} "
            f"({doc['executor'].get('nodes')} node(s), {doc['executor'].get('slots')} slot(s)); finished "
            f"{html.escape(doc['finished'])}</p><table><tr><th>model</th><th>verdict</th>"
            "<th>suspect labels / error</th><th>seconds</th><th>host</th><th></th></tr>"
            + "".join(rows) + "</table></body></html>\n")
