"""Auditing many models: discovery, manifests, one row per model, the files, and the CLI in this process.

The Ray executor is tested against real local and two-node clusters in tests/integration/test_ray_fleet.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guard.audit.fleet import (
    AuditOptions,
    FleetResult,
    ModelEntry,
    audit_payload,
    discover,
    error_row,
    payload,
    read_manifest,
    run_fleet,
)
from guard.errors import InputError


def fleet_dir(root: Path, demo_world, clean_world) -> Path:
    """A models folder as a registry export looks: two good models, one whose code does not import, one
    without weights, and a hidden folder that is not a model."""
    d = root / "models"
    for name, world in (("backdoored", demo_world), ("clean", clean_world)):
        (d / name).mkdir(parents=True)
        shutil.copy(world.model_file, d / name / "model.py")
        shutil.copy(world.weights, d / name / "weights.pt")
    (d / "broken").mkdir()
    (d / "broken" / "model.py").write_text("import torch\nclass Net(torch.nn.Module:\n")
    shutil.copy(demo_world.weights, d / "broken" / "weights.pt")
    (d / "no-weights").mkdir()
    shutil.copy(demo_world.model_file, d / "no-weights" / "model.py")
    (d / ".cache").mkdir()
    return d


def test_discover_lists_every_folder_and_refuses_an_empty_one(tmp_path):
    (tmp_path / "m" / "b").mkdir(parents=True)
    (tmp_path / "m" / "a").mkdir()
    (tmp_path / "m" / ".git").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("x")
    assert [e.name for e in discover(tmp_path / "m")] == ["a", "b"]
    assert discover(tmp_path / "m")[0].weights == tmp_path / "m" / "a" / "weights.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no model folders"):
        discover(tmp_path / "empty")
    with pytest.raises(InputError, match="is not a directory"):
        discover(tmp_path / "missing")
    (tmp_path / "bad" / "has space").mkdir(parents=True)
    with pytest.raises(InputError, match="model name 'has space'"):
        discover(tmp_path / "bad")


def test_manifest_paths_are_relative_to_it_and_bad_entries_are_named(tmp_path):
    m = tmp_path / "sub" / "fleet.yaml"
    m.parent.mkdir()
    m.write_text("models:\n  - {name: a, model_file: a/model.py, weights: a/w.pt, normalize: '0.5,0.25'}\n"
                 "  - name: b\n    model_file: /abs/model.py\n    weights: b.pt\n    model_class: Net\n")
    a, b = read_manifest(m)
    assert a == ModelEntry("a", m.parent / "a" / "model.py", m.parent / "a" / "w.pt", None, "0.5,0.25")
    assert b.model_file == Path("/abs/model.py") and b.model_class == "Net"
    j = tmp_path / "fleet.json"
    j.write_text(json.dumps([{"name": "x", "model_file": "m.py", "weights": "w.pt"},
                             {"name": "r", "uri": "models:/vision@guarded"}]))
    x, r = read_manifest(j)
    assert x.name == "x" and x.uri is None and r.uri == "models:/vision@guarded" and r.model_file is None
    cases = {
        "[]": "must list models",
        '[{"name": "x", "model_file": "m.py"}]': "entry 1 lacks weights",
        '[{"name": "x", "model_file": "m.py", "weights": "w", "weigths": 1}]': "unknown keys",
        '[{"name": "x", "model_file": "m.py", "weights": "w"}, {"name": "x", "model_file": "n.py", "weights": "v"}]':
            "listed twice",
        '[{"name": "../x", "model_file": "m.py", "weights": "w"}]': "model name",
        "models: [": "not valid JSON or YAML",
        '["m.py"]': "not an object",
        '[{"name": "x", "uri": "models:/a/1", "weights": "w"}]': "both a uri and files",
        '[{"name": "x", "uri": "runs:/abc/model"}]': "uri must be models:/NAME/VERSION",
    }
    for text, message in cases.items():
        j.write_text(text)
        with pytest.raises(InputError, match=message):
            read_manifest(j)
    with pytest.raises(InputError, match="cannot read the manifest"):
        read_manifest(tmp_path / "none.json")


class _Replaying:
    """An executor that delivers one model twice and another never: what the driver must not pass on."""

    def __init__(self, rows):
        self.rows = rows

    def describe(self):
        return {"kind": "test", "nodes": 1, "slots": 1}

    def run(self, payloads, x, y, options):
        list(payloads)
        yield from self.rows


def test_every_model_gets_exactly_one_row(tmp_path):
    entries = [ModelEntry(n, tmp_path / n / "model.py", tmp_path / n / "weights.pt") for n in ("a", "b", "c")]
    first = error_row("a", "first")
    rows = [first, error_row("a", "second"), error_row("c", "only"), error_row("stranger", "not asked for")]
    seen = []
    result = run_fleet(entries, None, None, options=AuditOptions(("df-tnd",)), executor=_Replaying(rows),
                       out=tmp_path / "out", progress=lambda row, so_far, total: seen.append((row["name"], total)))
    assert [r["name"] for r in result.rows] == ["a", "b", "c"]
    assert [r["error"] for r in result.rows] == ["first", "the executor returned no result for this model", "only"]
    assert result.duplicates_dropped == 2 and seen == [("a", 3), ("c", 3)]
    assert json.loads((tmp_path / "out" / "a" / "error.json").read_text())["error"] == "first"
    assert all(Path(r["report"]).is_file() for r in result.rows)  # the lost model's row has its file too
    assert all(r["registry"] is None and r["registry_error"] is None for r in result.rows)
    assert result.exit_code == 2 and result.counts == {"clean": 0, "backdoored": 0, "error": 3}
    assert FleetResult([]).exit_code == 0


def test_a_payload_names_what_is_missing_and_the_worker_returns_that_row(tmp_path):
    e = ModelEntry("m", tmp_path / "model.py", tmp_path / "weights.pt")
    p = payload(e)
    assert p.problem == f"no model file at {tmp_path / 'model.py'}" and p.weights == b""
    row = audit_payload(p, None, None, AuditOptions(("df-tnd",)))
    assert row["verdict"] == "error" and row["exit_code"] == 2 and row["error"] == p.problem


def test_local_fleet_audit_matches_one_audit_per_model(demo_world, clean_world, tmp_path, guard_cli):
    """`guard audit --models DIR --local`: each good model's row is what `guard audit` of that model alone
    says, the bad ones get their own error rows, and the run exits with the worst row's code."""
    d = fleet_dir(tmp_path, demo_world, clean_world)
    out = tmp_path / "out"
    proc = guard_cli("audit", "--models", str(d), "--methods", "df-tnd", "--out", str(out), "--local", "--json")
    assert proc.returncode == 2, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    rows = {r["name"]: r for r in doc["rows"]}
    assert [r["name"] for r in doc["rows"]] == ["backdoored", "broken", "clean", "no-weights"]
    assert doc["executor"]["kind"] == "local" and doc["models"] == 4 and doc["verdicts"]["error"] == 2
    assert "failed to import: SyntaxError" in rows["broken"]["error"] and str(d / "broken") in rows["broken"]["error"]
    assert rows["no-weights"]["error"] == f"no weights at {d / 'no-weights' / 'weights.pt'}"
    for name in ("backdoored", "clean"):
        alone = guard_cli("audit", "--model-file", str(d / name / "model.py"), "--weights",
                          str(d / name / "weights.pt"), "--methods", "df-tnd", "--out", str(tmp_path / f"alone-{name}"),
                          "--json")
        s = json.loads(alone.stdout)
        assert (rows[name]["verdict"], rows[name]["suspect_labels"]) == (s["verdict"], s["suspect_labels"])
        assert rows[name]["exit_code"] == alone.returncode and rows[name]["model_sha256"] == s["model_sha256"]
        report = json.loads((out / name / "report.json").read_text())
        for mine, theirs in zip(report["df_tnd"]["per_label"], s["df_tnd"]["per_label"], strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5)  # the lone audit ran with two threads, the row's with one
        assert (out / name / "report.html").read_text().startswith("<!DOCTYPE html>")
        fams = {f.name: f for f in text_string_to_metric_families((out / name / "metrics.prom").read_text())}
        assert fams["guard_audit_verdict"].samples[0].value == (1 if s["verdict"] == "backdoored" else 0)
    # the backdoored model's target leads DF-TND's ranking (whether it clears the bar depends on the CPU)
    per = json.loads((out / "backdoored" / "report.json").read_text())["df_tnd"]["per_label"]
    assert max(per, key=lambda r: r["logit_increase"])["label"] == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == doc["rows"] and summary["exit_code"] == 2
    fams = {f.name: f for f in text_string_to_metric_families((out / "metrics.prom").read_text())}
    by_name = {s.labels["name"]: s.value for s in fams["guard_fleet_model_verdict"].samples}
    assert by_name["broken"] == -1 and by_name["no-weights"] == -1 and len(by_name) == 4
    assert {s.labels["verdict"]: s.value for s in fams["guard_fleet_models"].samples}["error"] == 2
    page = (out / "summary.html").read_text()
    assert 'href="backdoored/report.html"' in page and 'href="broken/error.json"' in page and "no-weights" in page
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written model folder left
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 4 and lines[-1].startswith("[4/4]") and "so far" in lines[-1]


@pytest.mark.parametrize("extra, message", [
    (["--model-file", "m.py"], "leave out --model-file"),
    (["--address", "auto"], None),
    (["--manifest", "x.json"], "exactly one of --models DIR and --manifest FILE"),
    (["--local", "--max-rounds", "0"], "--max-rounds must be >= 1"),
])
def test_fleet_cli_refuses_mixed_arguments(tmp_path, guard_cli, extra, message):
    (tmp_path / "m" / "a").mkdir(parents=True)
    args = ["audit", "--models", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *extra]
    if message is None:  # --address with --local
        args.append("--local")
        message = "leave out --address"
    proc = guard_cli(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_single_audit_still_needs_its_model(tmp_path, guard_cli):
    proc = guard_cli("audit", "--out", str(tmp_path / "o"), "--methods", "df-tnd")
    assert proc.returncode == 2 and "give --model-file and --weights" in proc.stderr
    proc = guard_cli("audit", "--model-file", "m.py", "--weights", "w.pt", "--local", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "go with --models or --manifest" in proc.stderr


def test_row_data_shapes_are_checked_per_model(demo_world, tmp_path):
    """A model that does not take the fleet's images gets an error row, not a crash of the run."""
    import torch

    e = ModelEntry("m", Path(demo_world.model_file), Path(demo_world.weights))
    x = np.zeros((40, 1, 8, 8), np.float32)
    threads = torch.get_num_threads()
    row = audit_payload(payload(e), x, np.zeros(40, np.int64), AuditOptions(("df-tnd",), threads=threads + 1))
    assert row["verdict"] == "error" and "shape" in row["error"], row
    row = audit_payload(payload(e), None, None, AuditOptions(("df-tnd",), threads=threads + 1))
    assert row["verdict"] in ("clean", "backdoored") and row["exit_code"] in (0, 1)
    assert torch.get_num_threads() == threads  # the audit's thread count does not outlive it (the caller's process)


def test_orphaned_model_copies_of_dead_workers_are_swept(tmp_path):
    """A worker killed while it loads a model leaves the model's files in its temporary folder: a later
    audit on the host (or the driver at the end of the run) removes them, and only those."""
    import os
    import subprocess
    import sys

    from guard.audit.fleet import sweep_orphaned_copies

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    gone = tmp_path / f"guard-fleet-{int(dead.stdout)}-abc"
    mine = tmp_path / f"guard-fleet-{os.getpid()}-def"
    other = tmp_path / "guard-fleet-notapid-ghi"
    for d in (gone, mine, other):
        d.mkdir()
        (d / "weights.pt").write_bytes(b"x")
    assert sweep_orphaned_copies(tmp_path) == 1
    assert not gone.exists() and mine.exists() and other.exists()
    assert sweep_orphaned_copies(tmp_path) == 0
