"""Audit a model before rollout: run Neural Cleanse, DL-TND and/or DF-TND, combine their decisions,
and write DIR/report.json and a self-contained DIR/report.html (optionally Prometheus metrics).
Exit 0 when the model looks clean, 1 when a backdoor is suspected, 2 on bad input, 3 when --profile
belongs to another model, so a CI job can gate a rollout on it.

With ``--models DIR`` (one folder per model, each with ``model.py`` and ``weights.pt``) or ``--manifest
FILE`` it audits every model, one Ray task each (a local Ray instance unless ``--address`` names a
cluster; ``--local`` runs them in this process), writes each model's reports into ``OUT/NAME/`` and the
run's ``summary.json``, ``summary.html`` and ``metrics.prom``, and exits with the worst model's code
(2 when a model could not be audited)."""

from __future__ import annotations

import argparse
from pathlib import Path

from guard.cli._common import add_model_arguments, load_model_from, print_json
from guard.model import validate_input_shape

HELP = "audit a model (Neural Cleanse, DL-TND, DF-TND) and write report.json + report.html"


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}") from None
    if min(c, h, w) <= 0:
        raise argparse.ArgumentTypeError(f"every dimension must be positive, got {text!r}")
    return c, h, w


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_uri", nargs="?", metavar="MODEL_URI",
                   help="a registered version to audit instead of --model-file/--weights: models:/NAME/VERSION or "
                        "models:/NAME@ALIAS (MLflow; its state_dict.pth and model.py); the verdict is written back as "
                        "tags on the version")
    add_model_arguments(p, required=False)
    p.add_argument("--data", help="clean images: .npz (x, y) or a folder of class subfolders "
                   "(needed by nc, dl-tnd, blend and warp; df-tnd runs without)")
    p.add_argument("--out", required=True, help="report directory (must not exist or be empty, unless --force)")
    p.add_argument("--methods", default="nc,dl-tnd,df-tnd,blend,warp",
                   help="comma-separated subset of nc,dl-tnd,df-tnd,blend,warp")
    p.add_argument("--profile", help="profile directory of this model: reuse its Neural Cleanse scan "
                   "(exit 3 if it belongs to another model)")
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                   help="input shape for a data-free audit (default: probed from the model)")
    p.add_argument("--metrics-file", metavar="PATH", help="also write Prometheus text exposition here "
                   "(for node_exporter's textfile collector, e.g. /var/lib/node_exporter/textfile/guard_audit.prom)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where Neural Cleanse optimises the triggers: cpu (default) or "
                   "cuda[:N]")
    p.add_argument("--max-rounds", type=int, default=None, metavar="N",
                   help="Neural Cleanse's optimisation budget in rounds of two steps (default 200, as published)")
    p.add_argument("--force", action="store_true", help="write into a non-empty report directory")
    p.add_argument("--json", action="store_true", help="print report.json on stdout (progress stays on stderr); "
                   "with --models, one document with a row per model")
    g = p.add_argument_group("many models (instead of --model-file and --weights)")
    g.add_argument("--models", metavar="DIR", help="audit every model in DIR: one folder per model, each holding "
                   "model.py and weights.pt; the folder's name names the model")
    g.add_argument("--manifest", metavar="FILE", help="audit the models a JSON or YAML file lists: objects with name, "
                   "model_file, weights (relative to the file) and optionally model_class, normalize, feature_layer")
    g.add_argument("--address", help="Ray cluster to run on (auto, or the head's HOST:PORT; default: start a local "
                   "Ray instance and stop it after)")
    g.add_argument("--local", action="store_true", help="no Ray: audit the models one after another in this process")
    g.add_argument("--cpus-per-model", type=float, default=1.0, metavar="N",
                   help="CPUs each model's task asks Ray for, and its audit's torch threads (default 1)")
    g.add_argument("--gpus-per-model", type=float, default=0.0, metavar="N",
                   help="GPUs each model's task asks Ray for (default 0)")
    g.add_argument("--max-retries", type=int, default=3, metavar="N",
                   help="times Ray reruns a model whose worker was lost mid-audit (default 3)")
    g.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up on a model whose audit runs longer (its row says so; Ray only)")
    r = p.add_argument_group("model registry (with MODEL_URI)")
    r.add_argument("--tracking-uri", help="MLflow tracking and registry server (default: MLFLOW_TRACKING_URI, else "
                   "MLflow's local default)")
    r.add_argument("--set-alias", metavar="ALIAS", help="point ALIAS (e.g. guarded) at the version when the verdict is "
                   "clean; a suspect version that holds it loses it")
    r.add_argument("--experiment", default="guard-audit", help="MLflow experiment of the run that keeps the report and "
                   "profile (default guard-audit)")


def run(args: argparse.Namespace) -> int:
    from guard.errors import InputError

    many = args.models is not None or args.manifest is not None
    if many:
        if args.model_file or args.weights or args.profile or args.normalize or args.model_class:
            raise InputError("--models/--manifest name the models: leave out --model-file, --weights, --profile, "
                             "--normalize and --model-class (a manifest entry may set model_class and normalize)")
        if args.device != "cpu":
            raise InputError("--models audits on the CPUs Ray gives each model: ask for GPUs with --gpus-per-model")
        return _run_fleet(args)
    if args.local or args.address or args.timeout is not None:
        raise InputError("--address, --local and --timeout go with --models or --manifest")
    if args.model_uri is not None:
        return _run_registered(args)
    if args.set_alias or args.tracking_uri:
        raise InputError("--set-alias and --tracking-uri go with a MODEL_URI (models:/NAME/VERSION) or --manifest")
    if not (args.model_file and args.weights):
        raise InputError("give --model-file and --weights (or MODEL_URI, or --models DIR / --manifest FILE)")
    return _run_one(args)[0]


def _run_registered(args: argparse.Namespace) -> int:
    """Audit a registered version: fetch its files, audit them as --model-file/--weights, write the verdict back."""
    import sys
    from pathlib import Path

    from guard.cli._common import fetch_registered
    from guard.registry.mlflow_registry import record_verdict

    version = fetch_registered(args)
    try:
        args.model_file, args.weights = str(version.model_file), str(version.weights)
        code, result, out = _run_one(args, source={"registry": version.uri, "registry_source": version.source})
    finally:
        version.cleanup()
    written = record_verdict(version, result.summary, out, profile_dir=Path(args.profile) if args.profile else None,
                             alias=args.set_alias, experiment=args.experiment, tracking_uri=args.tracking_uri)
    alias = written["alias"]
    print(f"registry: tagged {version.uri} guard.verdict={result.summary['verdict']}; report and profile in run "
          f"{written['run_id']}" + (f"; alias {alias['name']} {alias['action']}" if alias else ""), file=sys.stderr)
    return code


def _run_one(args: argparse.Namespace, *, source: dict | None = None):
    """The single-model audit: ``(exit code, AuditResult, report folder)``."""
    from guard.audit.report import prepare_out_dir, write_report
    from guard.audit.rollout import METHODS, neural_cleanse, parse_methods, run_audit, write_metrics
    from guard.cli._common import parse_device
    from guard.data import load_data
    from guard.model import fingerprint
    from guard.profile import Profile

    device = parse_device(args.device)
    methods = parse_methods(args.methods)
    out = prepare_out_dir(args.out, force=args.force)  # refuse early, before minutes of scanning
    model = load_model_from(args)
    profile = Profile.load(args.profile, model_sha256=fingerprint(model)) if args.profile else None
    x = y = None
    if args.data:
        shape = profile.input_shape if profile else None
        x, y = load_data(args.data, shape=shape, need_labels="dl-tnd" in methods)
        validate_input_shape(model, x.shape[1:])
    elif args.input_shape:
        validate_input_shape(model, args.input_shape)
    source = {"model_file": Path(args.model_file).name, "weights": Path(args.weights).name,
              "data": str(args.data) if args.data else None, "profile": args.profile,
              "normalize": args.normalize, "model_class": args.model_class, **(source or {})}
    result = run_audit(model, x, y, methods=methods, seed=args.seed, profile=profile,
                       layer=args.feature_layer, source=source, input_shape=args.input_shape,
                       progress=None, nc=neural_cleanse(seed=args.seed, device=device, max_rounds=args.max_rounds))
    jpath, hpath = write_report(result, out, force=True)
    if args.metrics_file:
        write_metrics(result, args.metrics_file)
    if args.json:
        print_json(result.summary)
    else:
        s = result.summary
        print(f"verdict: {s['verdict']}" + (f" (suspect labels {s['suspect_labels']}; {s['rule']})"
                                            if s["suspect_labels"] else ""))
        for key in METHODS.values():
            if key in s:
                print(f"  {s[key]['method']:<15} {s[key]['decision']:<10} suspect {s[key]['suspect_labels'] or '-'}"
                      f"  {s['timings'][key]:.1f}s")
        print(f"report: {hpath} ({jpath.name}); {s['timings']['total']:.1f}s in all")
    return result.exit_code, result, out


def _run_fleet(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from guard.audit.executors import LocalExecutor, RayExecutor
    from guard.audit.fleet import AuditOptions, entries_of, run_fleet
    from guard.audit.fleet_report import summary, write_summary
    from guard.audit.report import prepare_out_dir
    from guard.audit.rollout import parse_methods
    from guard.data import load_data
    from guard.errors import InputError
    from guard.scan.neural_cleanse import validate_max_rounds

    methods = parse_methods(args.methods)
    entries = entries_of(args.models, args.manifest)
    if args.local and args.address:
        raise InputError("--local runs in this process: leave out --address")
    validate_max_rounds(args.max_rounds)  # refuse a bad budget before starting anything
    out = prepare_out_dir(args.out, force=args.force)
    x = y = None
    if args.data:
        x, y = load_data(args.data, need_labels="dl-tnd" in methods)
    options = AuditOptions(tuple(methods), args.seed, max(1, int(args.cpus_per_model)), args.max_rounds)
    executor = LocalExecutor() if args.local else RayExecutor(
        address=args.address, cpus_per_model=args.cpus_per_model, gpus_per_model=args.gpus_per_model,
        max_retries=args.max_retries, timeout_s=args.timeout)
    # Ray prints its workers' deaths on stdout; stdout carries only the --json document
    with contextlib.redirect_stdout(sys.stderr), executor:
        print(f"guard audit: {len(entries)} models on {_where(executor.describe())}", file=sys.stderr)
        result = run_fleet(entries, x, y, options=options, executor=executor, out=out, progress=_progress,
                           registry={"tracking_uri": args.tracking_uri, "alias": args.set_alias,
                                     "experiment": args.experiment})
    paths = write_summary(result, out)
    if args.json:
        print_json(summary(result))
    else:
        c = result.counts
        for r in result.rows:
            what = (f"suspect {r['suspect_labels']}" if r["suspect_labels"] else "") if r["verdict"] != "error" \
                else r["error"]
            print(f"  {r['name']:<24} {r['verdict']:<10} {what}")
        print(f"{len(result.rows)} models: {c['backdoored']} backdoored, {c['clean']} clean, {c['error']} not audited "
              f"in {result.seconds:.1f}s; summary: {paths['html']} ({paths['json'].name})")
    return result.exit_code


def _where(ex: dict) -> str:
    if ex["kind"] == "local":
        return "this process (--local)"
    return f"Ray ({ex['address']}: {ex['nodes']} node(s), {ex['slots']} audit(s) at a time)"


def _progress(row: dict, so_far, total: int) -> None:
    """One stderr line per finished model: which, its verdict, the counts so far and the time left."""
    import sys

    done = len(so_far.rows)
    c = so_far.counts
    elapsed = so_far.elapsed()
    eta = elapsed / done * (total - done) if done else 0.0
    what = row["error"] if row["verdict"] == "error" else (f"suspect {row['suspect_labels']}"
                                                           if row["suspect_labels"] else "")
    print(f"[{done}/{total}] {row['name']}: {row['verdict']} {what} ({row['seconds']:.1f}s) | so far "
          f"{c['backdoored']} backdoored, {c['clean']} clean, {c['error']} errors | about {eta:.0f}s left",
          file=sys.stderr, flush=True)
