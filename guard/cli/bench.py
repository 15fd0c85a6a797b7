"""Benchmark the defense on the attack zoo: one small model per attack (and a clean one), the offline
scans (Neural Cleanse, DL-TND, DF-TND), the online guard (AUROC and TPR at 1% FPR per check and
combined), the repair policy, STRIP, IBD-PSC, SCALE-UP, TED and TED++ (and ART's STRIP where installed)
on the same inputs, the white-box and gray-box attackers, offline purification (every guard purify
method with 20 and 50 clean images per class, judged with the real trigger; the gray-box keys judged
again against the purified model and a fresh scan of it), and the performance
figures (guard overhead, a served request's stages in the worker, batched Neural Cleanse speedup, scan
time, and in the full preset scan time at 32x32, 64x64 and 224x224; TorchServe throughput guarded over an
unguarded baseline handler at 4 and 16 clients, batch size 1 and 8, on TorchServe's port and through the
ingress). Writes DIR/results.json and DIR/results.md.

--quick runs a sample of the attacks (two of them adaptive) on DemoNet at the smallest sizes at which
the zoo's attacks work; the default is the full run (every attack on DemoNet and on a reduced-width
ResNet-18, larger data, more evaluation inputs; longer). --nets picks the networks. Trained
models are cached under DIR/models (safetensors) and reused by a rerun with the same configuration
and code; so are finished attack rows (DIR/rows), so a run that stops part-way resumes where it
stopped when started again with the same options. Exit code 0 when the run completed (targets
missed are reported, not an error)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = "benchmark scans, online guard, repair and STRIP on the attack zoo; write results.json/.md"


def _attacks(text: str) -> tuple[str, ...]:
    from guard.demo.attacks import ATTACKS

    names = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    return names


def _nets(text: str) -> tuple[str, ...]:
    from guard.demo.attacks.zoo import NETS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in NETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown network(s) {unknown}; known: {', '.join(NETS)}")
    return tuple(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json, results.md and models/ go")
    p.add_argument("--quick", action="store_true",
                   help="the quick configuration (a sample of the attacks, DemoNet only, small sizes)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test suite's configuration
    p.add_argument("--attacks", type=_attacks, metavar="A,B", help="only these attacks (default: the preset's)")
    p.add_argument("--nets", type=_nets, metavar="N,M",
                   help="train every attack on these networks (demo_net, resnet18; default: the preset's)")
    p.add_argument("--seed", type=int, help="zoo seed (default 0)")
    p.add_argument("--no-torchserve", action="store_true", help="skip the TorchServe throughput measurement")
    p.add_argument("--no-scaling", action="store_true",
                   help="skip the scan-cost figures: Neural Cleanse at 10, 100 and 1000 classes (about a quarter "
                        "hour) and, in the full preset, guard scan at 32x32, 64x64 and 224x224 (about half an hour)")
    p.add_argument("--no-art", action="store_true", help="skip ART's STRIP even where it is installed")
    p.add_argument("--no-purify", action="store_true",
                   help="skip the purification rows (every method at 20 and 50 clean images per class, with a "
                        "fresh scan of each subset; the longest part of a run after training)")
    p.add_argument("--trajectory", action="store_true",
                   help="scan every row as guard scan --trajectory does: the rows measure the guard with the "
                        "opt-in trajectory check")
    p.add_argument("--cache", metavar="DIR", help="trained-model cache (default DIR/models)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores on an idle machine, 1 on a busy one)")
    p.add_argument("--jobs", type=int, default=None,
                   help="attacks run side by side in this many single-threaded processes "
                        "(default: 2 on an idle machine with 2+ cores, else 1)")
    p.add_argument("--require-clean", action="store_true",
                   help="refuse to run unless guard/ is a git checkout's committed code (figures for the docs)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from guard.bench.config import PRESETS
    from guard.bench.report import render
    from guard.bench.runner import run_bench

    name = "tiny" if args.tiny else ("quick" if args.quick else "full")
    cfg = PRESETS[name]
    if args.attacks:
        cfg = replace(cfg, attacks=args.attacks)
    if args.nets:
        cfg = replace(cfg, nets=args.nets)
    if args.seed is not None:
        cfg = replace(cfg, zoo=replace(cfg.zoo, seed=args.seed))
    if args.no_torchserve:
        cfg = replace(cfg, torchserve=False)
    if args.no_scaling:
        cfg = replace(cfg, scaling=False, size_scaling=False)
    if args.no_art:
        cfg = replace(cfg, art=False)
    if args.no_purify:
        cfg = replace(cfg, purify_per_class=None)
    if args.trajectory:
        cfg = replace(cfg, trajectory=True)
    out = Path(args.out)
    command = "guard bench " + " ".join(a for a in sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "bench" \
        else f"guard bench --{name} --out {out}"

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    results = run_bench(cfg, out_dir=out, cache=Path(args.cache) if args.cache else None, threads=args.threads,
                        progress=None if os.environ.get("GUARD_BENCH_QUIET") else progress, command=command,
                        jobs=args.jobs, require_clean=args.require_clean)
    text = json.dumps(results, indent=2, sort_keys=False, default=float) + "\n"
    tmp = out / "results.json.tmp"
    tmp.write_text(text)
    tmp.replace(out / "results.json")
    (out / "results.md").write_text(render(results))
    if args.json:
        sys.stdout.write(text)
    else:
        print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({results['seconds']:.0f} s)")
    return 0
