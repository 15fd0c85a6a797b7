"""Purify a suspected model offline: remove its backdoor within a bound on the clean-accuracy drop.

A quarter of the clean images (stratified, seeded) is held out: the method never trains on it, and
measures clean accuracy on it before and after. A method whose held-out drop exceeds
--max-accuracy-drop is rolled back to its best state within the bound; when none is, nothing is
written and the command exits 1 with the figures. The output also gives a 95% upper confidence bound
of the drop on unseen images: what the held-out images can vouch for.

Methods: auto (default: runs the methods below that fit the model and keeps the one the reversed
triggers move least within the bound); combined (unlearning of the reversed triggers where they were
found and pasted anywhere, with Neural Cleanse run again on the partly purified model every 4
epochs); sau (shared adversarial unlearning: no reversed trigger needed); bn-tune (BatchNorm-aware:
only the normalisation layers and the last layers trained, with batch statistics that are then
re-estimated; the suspect labels' triggers reversed again every 5 epochs); rnp
(reconstructive neuron pruning: clean images only; BatchNorm networks); anp (adversarial neuron
pruning); unlearn (Neural Cleanse unlearning, a baseline); fine-pruning (a baseline). Every method
needs at least 10 clean images per class; with 20 the held-out images resolve 2 points each, so give
it 50 per class where you can (docs/benchmarks.md, Purification). "guard prune" is the former name
of this command and still works.

Prints a before/after table (or --json): held-out clean accuracy, the reversed triggers' attack
success, their success after one epoch of re-tuning with 1% of the images stamped with them (how deep
the repair went: a purified model that relapses as far as the original one was repaired on the surface),
the online checks' rejection of held-out images stamped with them, and a rescan's verdict and anomaly
index. Writes a state_dict that loads into the original model file.
Exit 0 when purified within the bound and the rescan is clean, 1 when the purification was refused
(over the bound) or a backdoor is still suspected (the rescan's verdict, or the reversed triggers still
reaching their label on half the held-out images or more, rescanned or not), 2 on bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

from guard.cli._common import add_model_arguments, load_model_from, open_interval, print_json
from guard.model import validate_input_shape

HELP = "remove a backdoor from a model (the best of several methods by default) within a clean-accuracy bound"


_share = open_interval(0, 1)

METHODS = ("auto", "combined", "sau", "bn-tune", "rnp", "anp", "unlearn", "fine-pruning")
"""guard.purify.METHODS, spelled out: importing it here would load torch for every ``guard --help``
(tests/purify/test_methods.py holds the two equal)."""
ALIASES = ("prune",)
"""Former names of the command (kept for one release: CHANGELOG.md)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="clean images: .npz (x, y) or a folder of class subfolders; at least 10 per class "
                        "(50 per class recommended)")
    p.add_argument("--profile", required=True, help="profile directory of this model (from guard scan)")
    p.add_argument("--out", required=True, help="where to write the purified state_dict (.pt)")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto (default: the best of the methods that fit the model); combined (reversed-"
                        "trigger unlearning, re-reversed every 4 epochs); sau (shared adversarial unlearning, "
                        "no reversed trigger needed); bn-tune (BatchNorm-aware tuning); rnp (clean images "
                        "only; BatchNorm networks); anp; unlearn (Neural Cleanse); fine-pruning. Each needs "
                        ">= 10 clean images per class")
    p.add_argument("--max-accuracy-drop", "--max-drop", dest="max_drop", type=float, default=2.0,
                   help="largest clean-accuracy drop allowed on the held-out images, in percentage points "
                        "(default 2); over it the method rolls back to its best state within, or refuses")
    p.add_argument("--holdout", type=_share, default=0.25,
                   help="share of the clean images held out to measure the drop (default 0.25)")
    p.add_argument("--cross-fit", type=int, default=0, metavar="FOLDS",
                   help="also measure the method's drop on every clean image: it runs once more per fold, learning "
                        "and selecting on the other folds, and each fold's images are judged by what that run kept "
                        "(0: off, the default; 4 is usual: five runs in all). Reported beside the held-out figure")
    p.add_argument("--share", type=_share,
                   help="unlearn, combined and bn-tune: share of each batch stamped with a reversed trigger "
                        "(default 0.2 unlearn, 0.5 the others; combined uses at least 0.5)")
    p.add_argument("--epochs", type=int,
                   help="fine-tuning epochs (default: 1 fine-pruning, 10 unlearn, sau and bn-tune, 12 "
                        "combined; anp and rnp do not fine-tune)")
    p.add_argument("--lr", type=float,
                   help="fine-tuning learning rate (Adam; default 0.001, 0.002 bn-tune; anp and rnp keep their own)")
    p.add_argument("--no-rescan", action="store_true", help="skip the Neural Cleanse scan of the result")
    p.add_argument("--no-online", action="store_true",
                   help="skip measuring the online checks' rejection of stamped held-out images")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where the Neural Cleanse re-reversals and the rescan run: cpu (default) or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print the before/after table as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    import sys

    from guard.cli._common import parse_device
    from guard.data import load_data
    from guard.errors import InputError
    from guard.model import fingerprint
    from guard.profile import Profile
    from guard.purify import purify

    device = parse_device(args.device)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"--out {out} exists (pass --force to overwrite)")
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out} is a directory; name a file such as purified.pt")
    if not 0 < args.max_drop < 100:
        raise InputError(f"--max-accuracy-drop is in percentage points and must be in (0, 100), got {args.max_drop}")
    if args.lr is not None and not args.lr > 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if args.epochs is not None and args.epochs < 0:
        raise InputError(f"--epochs must be >= 0, got {args.epochs}")
    model = load_model_from(args)
    profile = Profile.load(args.profile, model_sha256=fingerprint(model))
    x, y = load_data(args.data, shape=profile.input_shape)
    validate_input_shape(model, x.shape[1:])
    result = purify(model, x, y, profile, method=args.method, max_drop=args.max_drop / 100,
                    holdout_share=args.holdout, share=args.share, epochs=args.epochs, lr=args.lr, seed=args.seed,
                    rescan=not args.no_rescan, online=not args.no_online, progress=None, device=device,
                    cross_fit=args.cross_fit)
    if result.ok:
        result.save(out)
    table = result.table()
    drop = 100 * table["details"]["accuracy_drop"]
    watch = table["details"]["rescan_watch"]
    suspected = result.suspicions()
    if args.json:
        print_json({"method": args.method, "out": str(out) if result.ok else None, "rescan_watch": watch,
                    "still_suspected": suspected, **table})
    else:
        print(result.format_table())
        print(evidence_line(table["details"].get("evidence") or {}))
        if result.ok:
            d = table["details"]
            print(f"held-out clean accuracy drop {drop:.1f} points on {d['held_out']} images (bound "
                  f"{args.max_drop:g}); 95% upper bound on unseen images {100 * d['accuracy_drop_upper_95']:.1f} "
                  f"points; purified weights written to {out} (load them into {Path(args.model_file).name})")
            if d.get("cross_fitted"):
                print(d["cross_fitted"]["summary"])
            for note in ("resolution_note", "relapse_note"):
                if table["details"].get(note):
                    print(f"note: {table['details'][note]}")
            same = "".join(f" --{flag} {v}" for flag, v in (("model-class", args.model_class),
                                                            ("normalize", args.normalize),
                                                            ("feature-layer", args.feature_layer)) if v)
            print(f"rescan before serving (the profile is bound to the old weights): guard scan --model-file "
                  f"{args.model_file}{same} --weights {out} --data {args.data} --out PROFILE"
                  + (f" --watch {','.join(map(str, watch))}" if watch else ""))
    if not result.ok:
        b, a = table["before"]["clean_accuracy"], table["after"]["clean_accuracy"]
        if any(c["within"] for c in table["details"]["candidates"][1:]):
            why = "no purified state within the accuracy bound lowered the reversed triggers' success"
        else:
            why = (f"every purified state lost more than {args.max_drop:g} points of held-out clean accuracy "
                   f"({100 * b:.1f}% -> {100 * a:.1f}% at best)")
        print(f"guard {args.command}: refused: {why}; nothing written (more clean images or another "
              f"--method may help)", file=sys.stderr)
        return 1
    if suspected:
        print(f"guard {args.command}: backdoor still suspected: {'; '.join(suspected)} (serve neither model; "
              "another --method or more clean images may help)", file=sys.stderr)
        return 1
    if args.no_rescan and not args.json:
        print("note: not rescanned (--no-rescan): exit 0 rests on the reversed triggers and the held-out images "
              "alone")
    return 0


def evidence_line(ev: dict) -> str:
    """One line on where the purification's evidence came from (:meth:`guard.purify.Evidence.gather`)."""
    source = ev.get("source")
    if source == "profile":
        return "purified against the profile's reversed triggers (Neural Cleanse)"
    if source == "profile-warp":
        return "purified against the warp fields the profile's warp reversal flagged"
    ran = [(name, (ev.get(key) or {}).get("suspect_labels") or [])
           for name, key in (("a warp reversal", "warp_reversal"), ("a blend reversal", "blend_reversal"))
           if key in ev]
    found = [f"{name} on the clean images flagged label(s) {labels}" for name, labels in ran if labels]
    if found:
        return f"the profile names no suspect label; {found[0]}: purified against what it reversed"
    tried = " and ".join(name for name, _ in ran) or "no reversal"
    return f"the profile names no suspect label; {tried} flagged none: purified without a reversed trigger"
