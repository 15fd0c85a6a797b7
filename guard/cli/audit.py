"""Audit a model before rollout: run Neural Cleanse, DL-TND and/or DF-TND, combine their decisions,
and write DIR/report.json and a self-contained DIR/report.html (optionally Prometheus metrics).
Exit 0 when the model looks clean, 1 when a backdoor is suspected, 2 on bad input, 3 when --profile
belongs to another model, so a CI job can gate a rollout on it."""

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
    add_model_arguments(p)
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
    p.add_argument("--force", action="store_true", help="write into a non-empty report directory")
    p.add_argument("--json", action="store_true", help="print report.json on stdout (progress stays on stderr)")


def run(args: argparse.Namespace) -> int:
    from guard.audit.report import prepare_out_dir, write_report
    from guard.audit.rollout import METHODS, parse_methods, run_audit, write_metrics
    from guard.cli._common import parse_device
    from guard.data import load_data
    from guard.model import fingerprint
    from guard.profile import Profile
    from guard.scan import NeuralCleanse

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
              "normalize": args.normalize, "model_class": args.model_class}
    result = run_audit(model, x, y, methods=methods, seed=args.seed, profile=profile,
                       layer=args.feature_layer, source=source, input_shape=args.input_shape,
                       progress=None, nc=NeuralCleanse(seed=args.seed, device=device) if device != "cpu" else None)
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
    return result.exit_code
