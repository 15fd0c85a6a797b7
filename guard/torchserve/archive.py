"""Pack a model, its weights and its profile with guard's TorchServe handler into NAME.mar (``guard archive``).

The profile is verified against the model first (:class:`~guard.errors.ProfileMismatch` when it was
built for another model): an archive must never carry a profile that its handler would refuse at
load. The archive holds the model file, the state_dict, the handler (``guarded_handler.py``, installed
with guard: :mod:`guard._assets`), the profile as ``guard-profile/`` and a ``model-config.yaml`` with
TorchServe's worker and batching settings and a ``handler:`` section (mode, fail_open,
max_request_bytes, the profile's SHA-256 digest, the audit-log and metrics settings) that
:class:`guard.serving.service.GuardService` reads at load. The digest lets the service refuse a
profile edited inside the archive (:mod:`guard.serving.integrity`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from guard.errors import InputError
from guard.serving import DEFAULT_MAX_REQUEST_BYTES, PROFILE_DIR, default_max_request_bytes
from guard.serving.metrics import DEFAULT_FLUSH_SECONDS, flush_seconds


def make_archive(*, name: str, model_file: str | Path, weights: str | Path, profile: str | Path,
                 export_path: str | Path, model_class: str | None = None, normalize: str | None = None,
                 mode: str | None = None, fail_open: bool = False, batch_size: int = 1,
                 max_batch_delay: int = 100, workers: int = 1,
                 max_request_bytes: int | None = None, model_version: str = "1.0",
                 handler: str | Path | None = None, force: bool = False, log_payloads: bool = False,
                 audit_log: str | None = None, audit_max_bytes: int | None = None,
                 metrics_flush_seconds: float = DEFAULT_FLUSH_SECONDS) -> tuple[Path, dict[str, Any]]:
    """Verify the profile against the model, then write ``export_path/NAME.mar``.

    ``max_request_bytes`` bounds request bodies (413 above it); ``None``: room for a few JSON instances of the
    profile's input shape (:func:`~guard.serving.default_max_request_bytes`, at least 1 MiB).
    ``metrics_flush_seconds`` is how long the worker may sum pass counts before it reports them
    (:class:`~guard.serving.metrics.BatchedSink`; 0: every batch as it comes).

    Returns the archive path and the model-config written into it. Raises ``ProfileMismatch``
    (exit 3) when the profile belongs to another model, ``InputError``/``ModelError``/``ProfileError``
    (exit 2) for anything else wrong with the inputs.
    """
    from guard.model import fingerprint, load_model, validate_input_shape
    from guard.online.policy import validate_mode
    from guard.profile import JSON_NAME, TENSORS_NAME, Profile
    from guard.serving.integrity import profile_digest
    from guard.torchserve.server import HANDLER, require_script

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise InputError(f"--name {name!r}: use letters, digits, '_' and '-' (it becomes a URL path and a file name)")
    model_file, weights, profile_dir = Path(model_file), Path(weights), Path(profile)
    handler_file = Path(handler) if handler else HANDLER
    if not handler_file.is_file():
        raise InputError(f"handler file not found: {handler_file} (pass --handler PATH/guarded_handler.py)")
    model = load_model(model_file, weights, model_class_name=model_class, normalize=normalize)
    prof = Profile.load(profile_dir, model_sha256=fingerprint(model))
    validate_input_shape(model, prof.input_shape)
    if max_request_bytes is None:
        max_request_bytes = default_max_request_bytes(prof.input_shape)
    served_mode = validate_mode(mode or prof.meta.get("policy", {}).get("mode", "enforce"))
    try:
        metrics_flush_seconds = flush_seconds(metrics_flush_seconds)
    except ValueError as e:
        raise InputError(f"--metrics-flush-seconds: {e}") from None
    if model_file.name in (handler_file.name, "model-config.yaml") or weights.name == model_file.name:
        raise InputError(f"rename {model_file.name}: it would clash with another file in the archive")

    export = Path(export_path)
    export.mkdir(parents=True, exist_ok=True)
    target = export / f"{name}.mar"
    if target.exists() and not force:
        raise InputError(f"{target} exists: pass --force to overwrite it")
    config: dict[str, Any] = {
        "minWorkers": workers, "maxWorkers": workers,
        "batchSize": batch_size, "maxBatchDelay": max_batch_delay,
        "responseTimeout": 120,
        "handler": {
            "mode": served_mode, "fail_open": bool(fail_open), "max_request_bytes": int(max_request_bytes),
            "profile": PROFILE_DIR, "model_file": model_file.name, "weights": weights.name,
            "model_sha256": prof.model_sha256, "profile_sha256": profile_digest(profile_dir),
            "log_payloads": bool(log_payloads), "metrics_flush_seconds": metrics_flush_seconds,
        },
    }
    if audit_log:
        config["handler"]["audit_log"] = str(audit_log)
    elif workers > 1:  # rotation is per process: one file per worker process keeps each file single-writer
        config["handler"]["audit_log"] = "guard-audit-{model}-{pid}.log"
    if audit_max_bytes:
        config["handler"]["audit_max_bytes"] = int(audit_max_bytes)
    if model_class:
        config["handler"]["model_class"] = model_class
    if normalize:
        config["handler"]["normalize"] = normalize

    archiver = require_script("torch-model-archiver")
    with tempfile.TemporaryDirectory(prefix="guard-archive-") as tmp:
        stage = Path(tmp, "extra")
        (stage / PROFILE_DIR).mkdir(parents=True)
        for f in (JSON_NAME, TENSORS_NAME):
            shutil.copy2(profile_dir / f, stage / PROFILE_DIR / f)
        cfg_path = Path(tmp, "model-config.yaml")
        cfg_path.write_text("# written by guard archive\n" + yaml.safe_dump(config, sort_keys=False))
        work_tmp = Path(tmp, "archiver-tmp")  # torch-model-archiver stages in $TMPDIR/NAME: keep it private
        work_tmp.mkdir()
        cmd = [str(archiver), "--model-name", name, "--version", str(model_version),
               "--model-file", str(model_file.resolve()), "--serialized-file", str(weights.resolve()),
               "--handler", str(handler_file.resolve()), "--extra-files", str(stage),
               "--config-file", str(cfg_path), "--export-path", str(export.resolve())]
        if force:
            cmd.append("--force")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TMPDIR": str(work_tmp)})
    if done.returncode != 0 or not target.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise InputError(f"torch-model-archiver failed ({done.returncode}): {' '.join(detail[-3:])[:500]}")
    return target, config



__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "PROFILE_DIR", "make_archive"]
