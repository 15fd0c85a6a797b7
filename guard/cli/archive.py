"""Pack a model, its weights and its profile with guard's TorchServe handler into NAME.mar.

The profile is verified against the model first (exit 3 when it was built for another model): an
archive must never carry a profile that its handler would refuse at load. The archive holds the
model file, the state_dict, ``handlers/guarded_handler.py``, the profile as ``guard-profile/`` and a
``model-config.yaml`` with TorchServe's worker and batching settings and a ``handler:`` section (mode,
fail_open, max_request_bytes, the profile's SHA-256 digest, the audit-log settings) that the handler
reads at load.

Hardening defaults: requests above 1 MiB answer 413 (``--max-request-bytes``; ``guard serve`` sets
TorchServe's own ``max_request_size`` above it so guard's JSON 413 is what clients see); the handler
fails closed unless ``--fail-open`` is given (and then warns at every load); the audit trail never
holds request payloads unless ``--log-payloads``. The digest of the profile's files lets the handler
refuse a profile that was edited inside the archive (integrity, not authenticity: whoever can rewrite
the archive can rewrite the digest; sign the .mar where that matters).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from guard.errors import InputError

HELP = "package model + weights + profile with the guard handler into a TorchServe .mar"

PROFILE_DIR = "guard-profile"  # the handler's default (handlers/guarded_handler.py PROFILE_DIR)
DEFAULT_MAX_REQUEST_BYTES = 1_048_576  # 1 MiB: ~170 JSON instances of 3x32x32; the handler's default too


def profile_digest(directory: str | Path) -> dict[str, str]:
    """SHA-256 of each file of a profile directory (``profile.json``, ``tensors.safetensors``).

    Written into the archive's model-config at ``guard archive`` and checked by the handler at load,
    so a profile edited after archiving (thresholds raised, checks dropped) is refused.
    """
    from guard.profile import JSON_NAME, TENSORS_NAME

    out = {}
    for name in (JSON_NAME, TENSORS_NAME):
        h = hashlib.sha256()
        with open(Path(directory) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", "--model-name", dest="name", required=True,
                   help="model name: the archive is NAME.mar, served at /predictions/NAME")
    p.add_argument("--model-file", required=True, help="Python file defining the nn.Module class")
    p.add_argument("--model-class", help="class to use when the file defines several")
    p.add_argument("--weights", required=True, help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--normalize", metavar="MEAN,STD", help="normalisation the model expects (as given to guard scan)")
    p.add_argument("--profile", required=True, help="profile directory written by guard scan")
    p.add_argument("--export-path", required=True, help="directory to write NAME.mar to (created if missing)")
    p.add_argument("--mode", choices=["enforce", "repair", "shadow"],
                   help="policy served (default: the profile's own mode)")
    p.add_argument("--fail-open", action="store_true",
                   help="if the guard itself fails on a batch, answer the bare model's prediction marked "
                        "verdict=error instead of 503 (default: fail closed); logged as a WARNING at every load")
    p.add_argument("--batch-size", type=_positive, default=1, help="TorchServe batchSize (default 1)")
    p.add_argument("--max-batch-delay", type=_non_negative, default=100, metavar="MS",
                   help="TorchServe maxBatchDelay in ms (default 100)")
    p.add_argument("--workers", type=_positive, default=1, help="minWorkers = maxWorkers (default 1)")
    p.add_argument("--max-request-bytes", type=_positive, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"larger request bodies answer 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--log-payloads", action="store_true",
                   help="write the decoded request instance into each audit-log line (default: never)")
    p.add_argument("--audit-log", metavar="PATH",
                   help="audit log file ({model} and {pid} substituted; relative to TorchServe's log dir; "
                        "default guard-audit-{model}.log there; env GUARD_AUDIT_LOG overrides)")
    p.add_argument("--audit-max-bytes", type=_positive, default=None, metavar="N",
                   help="rotate the audit log at N bytes (default 10 MiB, 5 backups)")
    p.add_argument("--model-version", default="1.0", help="archive version (default 1.0)")
    p.add_argument("--handler", help="handler file (default: handlers/guarded_handler.py of this checkout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.mar")


def make_archive(*, name: str, model_file: str | Path, weights: str | Path, profile: str | Path,
                 export_path: str | Path, model_class: str | None = None, normalize: str | None = None,
                 mode: str | None = None, fail_open: bool = False, batch_size: int = 1,
                 max_batch_delay: int = 100, workers: int = 1,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, model_version: str = "1.0",
                 handler: str | Path | None = None, force: bool = False, log_payloads: bool = False,
                 audit_log: str | None = None, audit_max_bytes: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Verify the profile against the model, then write ``export_path/NAME.mar``.

    Returns the archive path and the model-config written into it. Raises ``ProfileMismatch``
    (exit 3) when the profile belongs to another model, ``InputError``/``ModelError``/``ProfileError``
    (exit 2) for anything else wrong with the inputs.
    """
    from guard.cli._common import model_input_shape
    from guard.model import fingerprint, load_model
    from guard.online.policy import check_mode
    from guard.profile import JSON_NAME, TENSORS_NAME, Profile
    from guard.torchserve.server import HANDLER, require_script

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise InputError(f"--name {name!r}: use letters, digits, '_' and '-' (it becomes a URL path and a file name)")
    model_file, weights, profile_dir = Path(model_file), Path(weights), Path(profile)
    handler_file = Path(handler) if handler else HANDLER
    if not handler_file.is_file():
        raise InputError(f"handler file not found: {handler_file} (pass --handler PATH/guarded_handler.py)")
    model = load_model(model_file, weights, model_class_name=model_class, normalize=normalize)
    prof = Profile.load(profile_dir, model_sha256=fingerprint(model))
    model_input_shape(model, prof.input_shape)
    served_mode = check_mode(mode or prof.meta.get("policy", {}).get("mode", "enforce"))
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
            "log_payloads": bool(log_payloads),
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


def run(args: argparse.Namespace) -> int:
    target, config = make_archive(
        name=args.name, model_file=args.model_file, weights=args.weights, profile=args.profile,
        export_path=args.export_path, model_class=args.model_class, normalize=args.normalize, mode=args.mode,
        fail_open=args.fail_open, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
        workers=args.workers, max_request_bytes=args.max_request_bytes, model_version=args.model_version,
        handler=args.handler, force=args.force, log_payloads=args.log_payloads, audit_log=args.audit_log,
        audit_max_bytes=args.audit_max_bytes)
    h = config["handler"]
    if h["fail_open"]:
        print("WARNING: --fail-open: if the guard itself fails, this archive serves the bare model's answers "
              "(verdict=error); the handler logs this at every load", file=sys.stderr)
    print(f"wrote {target} (mode {h['mode']}, fail_open {str(h['fail_open']).lower()}, batch size "
          f"{config['batchSize']}, max batch delay {config['maxBatchDelay']} ms, profile verified for model "
          f"{h['model_sha256'][:12]}…)")
    return 0
