"""Models that live in an MLflow model registry: fetch a registered version, write the audit's verdict back.

A version guard can load is an artifact folder holding the weights as a ``state_dict`` (what
``mlflow.pytorch.log_state_dict`` writes: ``state_dict.pth``, a ``torch.save`` zip read here with
``weights_only=True``) and the ``model.py`` that defines the network, logged beside it with
``mlflow.log_artifact``. A version holding a pickled full model (``mlflow.pytorch.log_model``) is refused, as a
pickled file is everywhere in guard: unpickling a model runs whatever code its author put in it.

After the audit, :func:`record_verdict` tags the version (``guard.verdict``, ``guard.suspect_labels``,
``guard.model_sha256``, ``guard.profile_sha256``, ``guard.audit_run_id``), logs the report and the profile as
artifacts of a run of their own (the version's training run stays as it was), and moves an alias (e.g.
``guarded``) onto the version only when the verdict is clean; a suspect version loses that alias if it held it.
The tracking server is MLflow's usual one (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's
local default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.errors import InputError

STATE_DICT = "state_dict.pth"
MODEL_FILE = "model.py"
EXPERIMENT = "guard-audit"
TAGS = ("guard.verdict", "guard.suspect_labels", "guard.model_sha256", "guard.profile_sha256", "guard.audit_run_id",
        "guard.model_name", "guard.model_version")
"""The tag keys guard writes: the first five on the audited version, the last two on the audit's own run."""
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))$")


def is_registry_uri(text: str | None) -> bool:
    """Whether ``text`` names a registered model version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``)."""
    return bool(text) and text.startswith("models:/")


@dataclass
class RegisteredVersion:
    """A fetched version: its name and number, the local copies of its files, and the folder that holds them
    (removed by :meth:`cleanup`)."""

    name: str
    version: str
    model_file: Path
    weights: Path
    source: str
    folder: Path
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _client(tracking_uri: str | None):
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError:
        raise InputError("model registry URIs need MLflow, which is not installed: pip install 'guard[registry]'"
                         ) from None
    if not sys.stderr.isatty():  # a CI log gets one line per problem, not MLflow's download bars
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient()


def _mlflow_error(e: Exception, what: str) -> InputError:
    message = getattr(e, "message", None) or str(e)
    return InputError(f"{what}: {message.strip().splitlines()[0] if message.strip() else type(e).__name__}")


def fetch(uri: str, *, tracking_uri: str | None = None) -> RegisteredVersion:
    """Download the version ``uri`` names into a temporary folder; InputError (one line) when the URI is
    malformed, the registry does not hold it, or what it holds is not a state_dict with its model.py."""
    from mlflow.exceptions import MlflowException

    m = _URI.match(uri)
    if m is None:
        raise InputError(f"expected models:/NAME/VERSION or models:/NAME@ALIAS, got {uri!r}")
    client = _client(tracking_uri)
    name = m["name"]
    try:
        mv = (client.get_model_version(name, m["version"]) if m["version"]
              else client.get_model_version_by_alias(name, m["alias"]))
        download_uri = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as e:
        raise _mlflow_error(e, f"the registry has no {uri}") from None
    folder = Path(tempfile.mkdtemp(prefix="guard-registry-"))
    try:
        from mlflow.artifacts import download_artifacts

        local = Path(download_artifacts(artifact_uri=download_uri, dst_path=str(folder)))
        if local.is_file():
            local = local.parent
        weights, model_file = local / STATE_DICT, local / MODEL_FILE
        if not weights.is_file():
            pickled = (local / "MLmodel").is_file() or any(local.rglob("model.pth"))
            raise InputError(f"{uri} holds " + ("a pickled model (mlflow.pytorch.log_model), which guard does not "
                                                "load: log its weights with mlflow.pytorch.log_state_dict and its "
                                                "model.py beside them" if pickled else
                                                f"no {STATE_DICT}: log the weights with mlflow.pytorch.log_state_dict"))
        if not model_file.is_file():
            raise InputError(f"{uri} holds no {MODEL_FILE} beside {STATE_DICT}: log the file that defines the network "
                             "with mlflow.log_artifact into the same folder")
    except MlflowException as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise _mlflow_error(e, f"cannot download {uri}") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RegisteredVersion(name, str(mv.version), model_file, weights, mv.source, folder, dict(mv.tags or {}))


def audited_profile(version: RegisteredVersion, *, tracking_uri: str | None = None) -> Path:
    """The profile the version's guard audit logged (``guard.audit_run_id``'s ``profile/``), downloaded beside its
    files and checked against the ``guard.profile_sha256`` tag: what ``guard archive MODEL_URI`` binds the
    endpoint to. InputError when the version was not audited with a profile, or the artifacts do not match."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    run_id, digest = version.tags.get("guard.audit_run_id"), version.tags.get("guard.profile_sha256")
    if not run_id or not digest:
        raise InputError(f"{version.uri} has no audited profile: run guard audit {version.uri} --profile DIR first "
                         "(or pass --profile to guard archive)")
    _client(tracking_uri)
    try:
        local = Path(download_artifacts(run_id=run_id, artifact_path="profile", dst_path=str(version.folder / "audit")))
    except MlflowException as e:
        raise _mlflow_error(e, f"cannot download the profile of {version.uri}'s audit (run {run_id})") from None
    check_profile(version, local)
    return local


def check_profile(version: RegisteredVersion, profile_dir: str | Path) -> None:
    """InputError unless ``profile_dir`` is the profile the version's audit recorded (its ``guard.profile_sha256``)."""
    digest = version.tags.get("guard.profile_sha256")
    if digest is None:
        raise InputError(f"{version.uri} carries no guard.profile_sha256 tag: audit it with --profile first")
    if profile_sha256(profile_dir) != digest:
        raise InputError(f"the profile {profile_dir} is not the one {version.uri}'s audit recorded "
                         f"(guard.profile_sha256 {digest[:12]}…)")


def profile_sha256(profile_dir: str | Path) -> str:
    """The SHA-256 of a profile folder's files (name and bytes of each, in name order): the digest the
    registry tag ``guard.profile_sha256`` holds, so a deployment can check the profile it fetched."""
    h = hashlib.sha256()
    for p in sorted(Path(profile_dir).iterdir()):
        if p.is_file():
            h.update(p.name.encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def record_verdict(version: RegisteredVersion, summary: dict[str, Any], report_dir: Path, *,
                   profile_dir: Path | None = None, alias: str | None = None, experiment: str = EXPERIMENT,
                   tracking_uri: str | None = None) -> dict[str, Any]:
    """Write the audit back to the registry (see the module); returns what was written: ``tags``,
    ``run_id`` and ``alias`` (``{"name", "action": "set" | "removed" | "kept off"}`` or None)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    verdict = summary["verdict"]
    try:  # MLflow prints run links on stdout, which carries guard's --json document: they go to stderr
        with contextlib.redirect_stdout(sys.stderr):
            return _record(client, version, summary, verdict, report_dir, profile_dir, alias, experiment)
    except MlflowException as e:
        raise _mlflow_error(e, f"cannot write the verdict back to {version.uri}") from None


def _record(client, version: RegisteredVersion, summary: dict[str, Any], verdict: str, report_dir: Path,
            profile_dir: Path | None, alias: str | None, experiment: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"audit {version.name} v{version.version}",
                            tags={"guard.model_name": version.name, "guard.model_version": version.version,
                                  "guard.verdict": verdict})
    run_id = run.info.run_id
    for name in ("report.json", "report.html", "metrics.prom"):
        if (report_dir / name).is_file():
            client.log_artifact(run_id, str(report_dir / name), artifact_path="report")
    tags = {"guard.verdict": verdict, "guard.suspect_labels": json.dumps(summary["suspect_labels"]),
            "guard.model_sha256": summary["model_sha256"], "guard.audit_run_id": run_id}
    if profile_dir is not None:
        client.log_artifacts(run_id, str(profile_dir), artifact_path="profile")
        tags["guard.profile_sha256"] = profile_sha256(profile_dir)
    client.set_terminated(run_id, status="FINISHED")
    for key, value in tags.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    moved = None
    if alias:
        moved = {"name": alias, "action": "kept off"}
        if verdict == "clean":
            client.set_registered_model_alias(version.name, alias, version.version)
            moved["action"] = "set"
        else:
            try:
                holder = client.get_model_version_by_alias(version.name, alias)
            except MlflowException:
                holder = None
            if holder is not None and str(holder.version) == version.version:
                client.delete_registered_model_alias(version.name, alias)
                moved["action"] = "removed"
    return {"tags": tags, "run_id": run_id, "alias": moved}
