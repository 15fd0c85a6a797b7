"""Repair a suspected model offline: Fine-Pruning (prune the last conv layer's channels that clean
data leaves dormant, within a bound on the clean-accuracy drop, then fine-tune) or unlearning
(fine-tune with a share of clean images stamped with the profile's reversed triggers at their true
labels). Writes a state_dict that loads into the original model file and prints a before/after
table: clean accuracy, attack success of the reversed trigger, and the guard scan verdict.
Exit 0 when the repaired model scans clean, 1 when a backdoor is still suspected."""

from __future__ import annotations

import argparse
from pathlib import Path

from guard.cli._common import add_model_arguments, load_model_from, print_json
from guard.serving.integrity import model_input_shape

HELP = "repair a model by fine-pruning or unlearning its reversed trigger"


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="clean images: .npz (x, y) or a folder of class subfolders")
    p.add_argument("--profile", required=True, help="profile directory of this model (from guard scan)")
    p.add_argument("--out", required=True, help="where to write the repaired state_dict (.pt)")
    p.add_argument("--method", choices=["fine-pruning", "unlearn"], default="unlearn")
    p.add_argument("--max-drop", type=float, default=2.0,
                   help="fine-pruning: largest clean-accuracy drop allowed, in percentage points (default 2)")
    p.add_argument("--share", type=_share, default=0.2, help="unlearning: share of images stamped (default 0.2)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: 1 fine-pruning, 10 unlearning)")
    p.add_argument("--no-rescan", action="store_true", help="skip the Neural Cleanse scan of the result")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the before/after table as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    from guard.data import load_data
    from guard.errors import InputError
    from guard.model import fingerprint
    from guard.profile import Profile
    from guard.repair.pruning import repair

    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"--out {out} exists (pass --force to overwrite)")
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out} is a directory; name a file such as repaired.pt")
    if not 0 < args.max_drop < 100:
        raise InputError(f"--max-drop is in percentage points and must be in (0, 100), got {args.max_drop}")
    if args.epochs is not None and args.epochs < 0:
        raise InputError(f"--epochs must be >= 0, got {args.epochs}")
    model = load_model_from(args)
    profile = Profile.load(args.profile, model_sha256=fingerprint(model))
    x, y = load_data(args.data, shape=profile.input_shape)
    model_input_shape(model, x.shape[1:])
    result = repair(model, x, y, profile, method=args.method, max_drop=args.max_drop / 100, share=args.share,
                    epochs=args.epochs, seed=args.seed, rescan=not args.no_rescan,
                    progress=None)
    result.save(out)
    table = result.table()
    if args.json:
        print_json({"method": args.method, "out": str(out), **table})
    else:
        print(result.format_table())
        print(f"repaired weights written to {out} (load them into {Path(args.model_file).name})")
    return 1 if table["after"]["verdict"] == "backdoored" else 0
