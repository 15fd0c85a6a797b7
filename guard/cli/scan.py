"""Scan a model with Neural Cleanse (all labels in one batched problem), pick suspect neurons,
calibrate every online check on held-out clean images, and write a profile bound to the model; then
ask the warp reversal whether a smooth warp carries the images to one label (a warping trigger, which
Neural Cleanse's small-region question does not find) and add its result to the profile (``guard audit
--profile`` reuses both). Exit 0 when nothing is suspected, 1 when either finds a backdoor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guard.cli._common import (
    add_model_arguments,
    fpr_arg,
    label_list,
    load_model_from,
    model_class_name,
    parse_device,
    print_json,
)
from guard.model import validate_input_shape
from guard.modes import MEMORY_WATCH, MODES

HELP = "scan a model and write its profile (Neural Cleanse + calibrated online checks)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="clean images: .npz (x, y) or a folder of class subfolders")
    p.add_argument("--out", required=True, help="profile directory to write")
    p.add_argument("--fpr", type=fpr_arg, default=0.01, help="false-positive rate the checks are calibrated for")
    p.add_argument("--mode", choices=MODES, default="enforce",
                   help="default policy stored in the profile")
    p.add_argument("--inner-layer", metavar="NAME",
                   help="module whose output the consistency check reads (default: the last spatial block, "
                   "found by a probe forward); --no-consistency leaves the check out")
    p.add_argument("--no-consistency", action="store_true", help="do not add the inner-layer consistency check")
    p.add_argument("--memory", choices=MEMORY_WATCH, default="suspects",
                   help="the stateful trigger memory: reject a query whose trigger-like residual matches three recent "
                        "queries' (reason repeated_trigger), catching a fixed trigger from its fourth query on; "
                        "it watches the queries assigned to the suspect labels (default; none found: every label at a "
                        "tenth of the FPR), all labels, or is off. About 0.1 ms per query on a 2-core CPU, per "
                        "serving worker")
    p.add_argument("--watch", type=label_list, default=[], metavar="LABELS",
                   help="labels the trigger memory watches beside the scan's suspects, comma-separated (e.g. 6 or "
                        "3,6)")
    p.add_argument("--watch-from", metavar="PROFILE",
                   help="watch every label an earlier profile holds suspect: scanning the model guard purify made "
                        "of that profile's model, keep the memory on the original suspects (a key optimised on the "
                        "attacked weights can still reach its target on the purified ones)")
    p.add_argument("--trajectory", action="store_true",
                   help="add the trajectory check: follow each query's rank among clean images of its predicted class "
                        "through every layer (as TED) and reject one that joins it only late, which catches triggers "
                        "re-optimised to match clean statistics in aggregate; it hooks every layer and searches up "
                        "to 20 references per class per layer (cost in docs/benchmarks.md); its false alarms add half "
                        "the FPR to the other checks'")
    p.add_argument("--min-per-class", type=int, default=None, metavar="N",
                   help="refuse data with fewer than N clean images of some class (default 2; 0 scans anyway)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where Neural Cleanse optimises the triggers: cpu (default) or "
                   "cuda[:N]; all labels are optimised as one batched problem, which is what a GPU is for "
                   "(docs/benchmarks.md has the CPU figures)")
    p.add_argument("--max-rounds", type=int, default=200, metavar="N",
                   help="Neural Cleanse's optimisation budget in rounds of two steps (default 200, as published)")
    p.add_argument("--screen-above", type=int, metavar="K",
                   help="with more than K classes, screen labels first and optimise only the candidates and "
                        "random references in full (default 25; 0 screens always)")
    p.add_argument("--adaptive-steps", type=int, default=None, metavar="N",
                   help="Adam steps of the scan's own adaptive key per suspect label, which weights the online "
                        "checks by what still sees a trigger adapted to guard (default 0: off; 300 as measured in "
                        "docs/benchmarks.md)")
    p.add_argument("--no-warp", action="store_true",
                   help="skip the warp reversal (then only Neural Cleanse decides the exit code)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def run(args: argparse.Namespace) -> int:
    from guard.data import load_data
    from guard.errors import InputError
    from guard.scan import NeuralCleanse, build_profile
    from guard.scan.neural_cleanse import validate_max_rounds
    from guard.scan.profile_builder import MIN_PER_CLASS, validate_adaptive_steps

    device = parse_device(args.device)
    min_per_class = MIN_PER_CLASS if args.min_per_class is None else args.min_per_class
    if min_per_class < 0:
        raise InputError(f"--min-per-class must be >= 0, got {args.min_per_class}")
    validate_max_rounds(args.max_rounds)
    validate_adaptive_steps(args.adaptive_steps)  # refuse a bad budget before loading anything
    adaptive = {} if args.adaptive_steps is None else {"adaptive_steps": args.adaptive_steps}
    if args.screen_above is not None and args.screen_above < 0:
        raise InputError(f"--screen-above must be >= 0, got {args.screen_above}")
    watch = set(args.watch)
    if args.watch_from:
        from guard.profile import Profile

        watch |= set(Profile.load(args.watch_from).watched_labels())
    model = load_model_from(args)
    x, y = load_data(args.data)
    validate_input_shape(model, x.shape[1:])
    progress = None if not args.json else sys.stderr.isatty()
    screen = {} if args.screen_above is None else {"screen_above": args.screen_above}
    source = {"model_file": str(Path(args.model_file).name), "weights": str(Path(args.weights).name),
              "data": str(args.data), "normalize": args.normalize, "model_class": model_class_name(model)}
    profile, summary = build_profile(model, x, y, fpr=args.fpr, seed=args.seed, mode=args.mode,
                                     layer=args.feature_layer, source=source, progress=progress,
                                     consistency=not args.no_consistency, inner=args.inner_layer,
                                     memory=args.memory, min_per_class=min_per_class, trajectory=args.trajectory,
                                     watch=watch, **adaptive,
                                     nc=NeuralCleanse(seed=args.seed, progress=progress, device=device,
                                                      max_rounds=args.max_rounds, **screen))
    summary["profile"] = str(args.out)
    warped: list[int] = []
    try:
        if not args.no_warp:
            from guard.scan.warp import WarpReversal

            wr = WarpReversal(seed=args.seed, progress=progress).fit(model, x, y)
            warped = list(wr.suspect_labels_)
            profile.set_warp(*wr.to_profile())
            summary["warp"] = {"suspect_labels": warped, "threshold": wr.threshold,
                               "lead": {str(j): round(float(v), 4) for j, v in enumerate(wr.lead_)},
                               "seconds": round(wr.seconds_, 2)}
    finally:  # written once, with the warp result; without it when the reversal fails or is interrupted
        profile.save(args.out)
    summary["verdict"] = "backdoored" if summary["suspect_labels"] or warped else "clean"
    if args.json:
        print_json(summary)
    else:
        sus = summary["suspect_labels"]
        print(f"scanned in {summary['seconds']:.1f}s; suspect labels: {sus if sus else 'none'}; "
              f"profile written to {args.out}")
        for lab, ai in summary["anomaly_index"].items():
            print(f"  label {lab:>3}: L1 {summary['l1_norm'][lab]:8.2f}  anomaly index {ai:6.2f}  "
                  f"(log-scale {summary['log_anomaly_index'][lab]:6.2f})")
        if "warp" in summary:
            print(f"warp reversal in {summary['warp']['seconds']:.1f}s: suspect labels {warped or 'none'} (a smooth "
                  f"warp carries images there with {summary['warp']['threshold']:.0%}+ less displacement than to "
                  "any other label)" if warped else
                  f"warp reversal in {summary['warp']['seconds']:.1f}s: no label stands out")
    return 1 if summary["verdict"] == "backdoored" else 0
