"""``guard archive``: pack a model, its weights and its profile with guard's TorchServe handler into NAME.mar.

Arguments and printing only; the packing is :func:`guard.torchserve.archive.make_archive`.

The profile is verified against the model first (exit 3 when it was built for another model): an
archive must never carry a profile that its handler would refuse at load. The archive holds the
model file, the state_dict, the guarded handler (``handlers/guarded_handler.py``), the profile as
``guard-profile/`` and a ``model-config.yaml`` with TorchServe's worker and batching settings and a
``handler:`` section (mode, fail_open, max_request_bytes, the profile's SHA-256 digest, the audit-log
settings) that the handler reads at load.

Hardening defaults: requests above room for four JSON instances of the model's input (20 bytes a value; 1 MiB
at least: 1 MiB for 3x32x32, 12 MB for 3x224x224) answer 413 (``--max-request-bytes``; ``guard serve`` sets
TorchServe's own ``max_request_size`` above it so guard's JSON 413 is what clients see); the handler
fails closed unless ``--fail-open`` is given (and then warns at every load); the audit trail never
holds request payloads unless ``--log-payloads``. The digest of the profile's files lets the handler
refuse a profile that was edited inside the archive (integrity, not authenticity: whoever can rewrite
the archive can rewrite the digest; sign the .mar where that matters).
"""

from __future__ import annotations

import argparse
import sys

from guard.modes import MODES
from guard.serving import DEFAULT_MAX_REQUEST_BYTES
from guard.serving.metrics import DEFAULT_FLUSH_SECONDS, flush_seconds

HELP = "package model + weights + profile with the guard handler into a TorchServe .mar"


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


def _seconds(text: str) -> float:
    try:
        return flush_seconds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", "--model-name", dest="name", required=True,
                   help="model name: the archive is NAME.mar, served at /predictions/NAME")
    p.add_argument("model_uri", nargs="?", metavar="MODEL_URI",
                   help="a registered version instead of --model-file/--weights: models:/NAME/VERSION or "
                        "models:/NAME@ALIAS, audited by guard audit with a profile; the archive carries that "
                        "profile (checked against the version's guard.profile_sha256 tag)")
    p.add_argument("--model-file", help="Python file defining the nn.Module class")
    p.add_argument("--model-class", help="class to use when the file defines several")
    p.add_argument("--weights", help="state_dict file (loaded with weights_only=True)")
    p.add_argument("--normalize", metavar="MEAN,STD", help="normalisation the model expects (as given to guard scan)")
    p.add_argument("--profile", help="profile directory written by guard scan (with MODEL_URI: default the one its "
                   "audit logged)")
    p.add_argument("--tracking-uri", help="MLflow tracking and registry server for MODEL_URI (default: "
                   "MLFLOW_TRACKING_URI, else MLflow's local default)")
    p.add_argument("--export-path", required=True, help="directory to write NAME.mar to (created if missing)")
    p.add_argument("--mode", choices=MODES,
                   help="policy served (default: the profile's own mode)")
    p.add_argument("--fail-open", action="store_true",
                   help="if the guard itself fails on a batch, answer the bare model's prediction marked "
                        "verdict=error instead of 503 (default: fail closed); logged as a WARNING at every load")
    p.add_argument("--batch-size", type=_positive, default=1, help="TorchServe batchSize (default 1)")
    p.add_argument("--max-batch-delay", type=_non_negative, default=100, metavar="MS",
                   help="TorchServe maxBatchDelay in ms (default 100)")
    p.add_argument("--workers", type=_positive, default=1, help="minWorkers = maxWorkers (default 1)")
    p.add_argument("--max-request-bytes", type=_positive, default=None,
                   help="larger request bodies answer 413 (default: room for 4 JSON instances of the model's input, "
                        f"at least {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--log-payloads", action="store_true",
                   help="write the decoded request instance into each audit-log line (default: never)")
    p.add_argument("--audit-log", metavar="PATH",
                   help="audit log file ({model} and {pid} substituted; relative to TorchServe's log dir; "
                        "default guard-audit-{model}.log there; env GUARD_AUDIT_LOG overrides)")
    p.add_argument("--audit-max-bytes", type=_positive, default=None, metavar="N",
                   help="rotate the audit log at N bytes (default 10 MiB, 5 backups)")
    p.add_argument("--metrics-flush-seconds", type=_seconds, default=DEFAULT_FLUSH_SECONDS, metavar="S",
                   help="the worker sums pass counts and reports them at most every S seconds; anything but a "
                        f"pass is reported with its batch; 0 reports every batch (default {DEFAULT_FLUSH_SECONDS:g})")
    p.add_argument("--model-version", default="1.0", help="archive version (default 1.0)")
    p.add_argument("--handler", help="handler file (default: the guarded handler installed with guard)")
    p.add_argument("--force", action="store_true", help="overwrite an existing NAME.mar")


def run(args: argparse.Namespace) -> int:
    from guard.errors import InputError

    if args.model_uri is None:
        missing = [f for f, v in (("--model-file", args.model_file), ("--weights", args.weights),
                                  ("--profile", args.profile)) if not v]
        if missing:
            raise InputError(f"give {', '.join(missing)} (or a MODEL_URI, models:/NAME/VERSION)")
        return _archive(args)
    from guard.cli._common import fetch_registered
    from guard.registry.mlflow_registry import audited_profile, check_profile

    version = fetch_registered(args)
    try:
        if args.profile:
            check_profile(version, args.profile)
        else:
            args.profile = str(audited_profile(version, tracking_uri=args.tracking_uri))
        args.model_file, args.weights = str(version.model_file), str(version.weights)
        print(f"archiving {version.uri} (audited {version.tags.get('guard.verdict')}, suspect labels "
              f"{version.tags.get('guard.suspect_labels')})", file=sys.stderr)
        return _archive(args)
    finally:
        version.cleanup()


def _archive(args: argparse.Namespace) -> int:
    from guard.torchserve.archive import make_archive

    target, config = make_archive(
        name=args.name, model_file=args.model_file, weights=args.weights, profile=args.profile,
        export_path=args.export_path, model_class=args.model_class, normalize=args.normalize, mode=args.mode,
        fail_open=args.fail_open, batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
        workers=args.workers, max_request_bytes=args.max_request_bytes, model_version=args.model_version,
        handler=args.handler, force=args.force, log_payloads=args.log_payloads, audit_log=args.audit_log,
        audit_max_bytes=args.audit_max_bytes, metrics_flush_seconds=args.metrics_flush_seconds)
    h = config["handler"]
    if h["fail_open"]:
        print("WARNING: --fail-open: if the guard itself fails, this archive serves the bare model's answers "
              "(verdict=error); the handler logs this at every load", file=sys.stderr)
    print(f"wrote {target} (mode {h['mode']}, fail_open {str(h['fail_open']).lower()}, batch size "
          f"{config['batchSize']}, max batch delay {config['maxBatchDelay']} ms, profile verified for model "
          f"{h['model_sha256'][:12]}…)")
    return 0
