"""`guard audit models:/NAME/VERSION` against a real MLflow tracking server (SQLite backend) on loopback:
the registered state_dict is fetched and audited, the verdict lands as tags on the version, the report and
the profile as a run's artifacts, an alias moves only onto a clean version, and what guard will not load
(a pickled model, a version that is not there) is refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

pytestmark = [pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, started here and killed by pid after."""
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(d / "server.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (d / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _register(url: str, name: str, world, tmp: Path) -> str:
    """Register ``world``'s model as a user does: its state_dict (mlflow.pytorch's format) and model.py in one
    artifact folder of a run, that folder as the version's source. Returns the version."""
    import torch
    from mlflow.pytorch import save_state_dict

    client = _client(url)
    folder = tmp / f"{name}-model"
    save_state_dict(torch.load(world.weights, weights_only=True), str(folder))
    shutil.copy(world.model_file, folder / "model.py")
    exp = client.get_experiment_by_name("training")
    run = client.create_run(exp.experiment_id if exp else client.create_experiment("training"))
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


@pytest.fixture(scope="module")
def guard_cli():
    from cli_helpers import run_cli

    return run_cli


def _audit(guard_cli, url, uri, out, *extra):
    return guard_cli("audit", uri, "--tracking-uri", url, "--out", str(out), *extra)


def test_registered_versions_get_their_verdict_and_the_alias_only_when_clean(
        tracking, demo_world, demo_profile, clean_world, clean_scan, tmp_path, guard_cli):
    from guard.registry.mlflow_registry import profile_sha256

    client = _client(tracking)
    bad = _register(tracking, "vision", demo_world, tmp_path)
    good = _register(tracking, "vision", clean_world, tmp_path)
    client.set_registered_model_alias("vision", "guarded", bad)  # held by the backdoored version before its audit
    client.set_registered_model_alias("vision", "candidate", good)
    clean_profile = clean_scan.profile.save(tmp_path / "clean-profile")

    proc = _audit(guard_cli, tracking, f"models:/vision/{bad}", tmp_path / "r1", "--methods", "nc", "--profile",
                  str(demo_profile), "--data", str(demo_world.clean), "--set-alias", "guarded", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    s = json.loads(proc.stdout)  # stdout holds only the report, whatever MLflow prints
    assert s["suspect_labels"] == [6] and s["source"]["registry"] == f"models:/vision/{bad}"
    tags = client.get_model_version("vision", bad).tags
    assert tags["guard.verdict"] == "backdoored" and json.loads(tags["guard.suspect_labels"]) == [6]
    assert tags["guard.model_sha256"] == s["model_sha256"]
    assert tags["guard.profile_sha256"] == profile_sha256(demo_profile)
    run_id = tags["guard.audit_run_id"]
    assert {a.path for a in client.list_artifacts(run_id, "report")} >= {"report/report.json", "report/report.html"}
    assert {a.path for a in client.list_artifacts(run_id, "profile")} == {
        f"profile/{p.name}" for p in Path(demo_profile).iterdir() if p.is_file()}
    assert "guarded" not in client.get_model_version("vision", bad).aliases  # taken off the suspect version
    assert "alias guarded removed" in proc.stderr

    proc = _audit(guard_cli, tracking, "models:/vision@candidate", tmp_path / "r2", "--methods", "nc", "--profile",
                  str(clean_profile), "--data", str(clean_world.clean), "--set-alias", "guarded")
    assert proc.returncode == 0, proc.stderr[-2000:]
    v = client.get_model_version("vision", good)
    assert v.tags["guard.verdict"] == "clean" and v.tags["guard.suspect_labels"] == "[]"
    assert client.get_model_version_by_alias("vision", "guarded").version == good

    # the endpoint is bound to the audited version: its files and the profile its audit logged
    proc = guard_cli("archive", "models:/vision@guarded", "--tracking-uri", tracking, "--name", "vision",
                     "--export-path", str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    with zipfile.ZipFile(tmp_path / "store" / "vision.mar") as z:
        for f in Path(clean_profile).iterdir():
            assert z.read(f"guard-profile/{f.name}") == f.read_bytes()
    proc = guard_cli("archive", f"models:/vision/{good}", "--tracking-uri", tracking, "--name", "other",
                     "--export-path", str(tmp_path / "store"), "--profile", str(demo_profile))
    assert proc.returncode == 2 and "is not the one models:/vision/" in proc.stderr, proc.stderr[-1500:]


def test_what_guard_does_not_load_is_refused_in_one_line(tracking, demo_world, demo_profile, clean_world, tmp_path,
                                                         guard_cli):
    url = tracking
    code = ("import sys, torch, mlflow\nmlflow.set_tracking_uri(sys.argv[1])\n"
            "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))\n"
            "with mlflow.start_run():\n"
            "    mlflow.pytorch.log_model(net, name='model', serialization_format='pickle', "
            "registered_model_name='pickled')\n")
    logged = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-2000:]
    other = _register(url, "other", clean_world, tmp_path)
    from guard.errors import InputError
    from guard.registry.mlflow_registry import fetch

    for uri, message in [("models:/vision/99", "the registry has no models:/vision/99"),
                         ("models:/vision@nobody", "the registry has no models:/vision@nobody"),
                         ("models:/vision", "expected models:/NAME/VERSION or models:/NAME@ALIAS")]:
        with pytest.raises(InputError, match=message):
            fetch(uri, tracking_uri=url)
    # through the CLI: exit 2 and one line on stderr, whatever MLflow logs while it downloads
    for i, (uri, message) in enumerate([("models:/pickled/1", "holds a pickled model (mlflow.pytorch.log_model)"),
                                        ("runs:/abc/model", "MODEL_URI must be models:/NAME/VERSION")]):
        proc = _audit(guard_cli, url, uri, tmp_path / f"x{i}", "--methods", "df-tnd")
        assert proc.returncode == 2 and message in proc.stderr, (uri, proc.stderr[-1500:])
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # a profile of another model: the audit refuses it (exit 3) and writes nothing back
    proc = _audit(guard_cli, url, f"models:/other/{other}", tmp_path / "y", "--methods", "nc", "--profile",
                  str(demo_profile), "--data", str(demo_world.clean))
    assert proc.returncode == 3, proc.stderr[-1500:]
    assert "guard.verdict" not in _client(url).get_model_version("other", other).tags
    proc = guard_cli("archive", f"models:/other/{other}", "--tracking-uri", url, "--name", "other", "--export-path",
                     str(tmp_path / "store"))
    assert proc.returncode == 2 and "has no audited profile" in proc.stderr, proc.stderr[-1500:]


def test_a_manifest_of_registered_versions_tags_each_one(tracking, demo_world, clean_world, tmp_path, guard_cli):
    """`guard audit --manifest` with registry URIs beside a local model: the driver fetches each version, the
    audits run as any other, and each version gets its own verdict tags; a URI the registry lacks is its row."""
    client = _client(tracking)
    bad = _register(tracking, "fleet", demo_world, tmp_path)
    good = _register(tracking, "fleet", clean_world, tmp_path)
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(f"models:\n  - {{name: bad, uri: 'models:/fleet/{bad}'}}\n"
                        f"  - {{name: good, uri: 'models:/fleet/{good}'}}\n"
                        "  - {name: gone, uri: 'models:/fleet/77'}\n"
                        f"  - {{name: local, model_file: {demo_world.model_file}, weights: {demo_world.weights}}}\n")
    proc = guard_cli("audit", "--manifest", str(manifest), "--tracking-uri", tracking, "--methods", "df-tnd",
                     "--out", str(tmp_path / "out"), "--local", "--json", "--set-alias", "guarded")
    assert proc.returncode == 2, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout)["rows"]}
    assert rows["gone"]["verdict"] == "error" and "the registry has no models:/fleet/77" in rows["gone"]["error"]
    assert rows["local"]["registry"] is None and rows["bad"]["registry"] == f"models:/fleet/{bad}"
    assert rows["bad"]["model_sha256"] == rows["local"]["model_sha256"]  # the same weights, fetched or read
    for name, version in (("bad", bad), ("good", good)):
        assert rows[name]["registry_error"] is None
        tags = client.get_model_version("fleet", version).tags
        assert tags["guard.verdict"] == rows[name]["verdict"]
        assert tags["guard.model_sha256"] == rows[name]["model_sha256"]
        assert json.loads(tags["guard.suspect_labels"]) == rows[name]["suspect_labels"]
    holder = [v for v in (bad, good) if "guarded" in client.get_model_version("fleet", v).aliases]
    assert holder == ([good] if rows["good"]["verdict"] == "clean" else [])
