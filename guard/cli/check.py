"""Replay the online path offline: run the guard over a dataset and count each verdict and the
accuracy of the answers it gave. Exit 1 when any input was stopped or flagged, else 0."""

from __future__ import annotations

import argparse

from guard.cli._common import add_model_arguments, load_model_from, print_json
from guard.modes import MODES

HELP = "replay the guard offline on a dataset and count verdicts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--profile", required=True, help="profile directory written by guard scan")
    p.add_argument("--data", required=True, help=".npz (x, y) or image folder to replay")
    p.add_argument("--mode", choices=MODES, help="override the profile's mode")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", action="store_true")


def evaluate(guard, x, y, *, batch_size: int = 64) -> dict:
    """Counts of each verdict, accuracy of the answers given, and reasons, over (x, y)."""
    from collections import Counter

    counts = Counter({"pass": 0, "repaired": 0, "rejected": 0, "flagged": 0})
    reasons: Counter = Counter()
    correct = answered = 0
    for i in range(0, len(x), batch_size):
        for d, label in zip(guard.predict(x[i:i + batch_size]), y[i:i + batch_size]):
            counts[d.verdict] += 1
            reasons.update(d.reasons)
            if d.label is not None:
                answered += 1
                correct += int(d.label == label)
    n = len(x)
    return {"n": n, **dict(counts), "reasons": dict(reasons),
            "accuracy": correct / answered if answered else None,
            "accuracy_overall": correct / n,
            "stopped_or_flagged": (n - counts["pass"]) / n}


def run(args: argparse.Namespace) -> int:
    from guard.data import load_data
    from guard.model import fingerprint
    from guard.online import Guard
    from guard.profile import Profile

    model = load_model_from(args)
    profile = Profile.load(args.profile, model_sha256=fingerprint(model))
    x, y = load_data(args.data, shape=profile.input_shape)
    guard = Guard(model, profile, mode=args.mode, verify=False)
    result = evaluate(guard, x, y, batch_size=args.batch_size)
    result["mode"] = guard.mode
    if args.json:
        print_json(result)
    else:
        acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.3f}"
        print(f"{result['n']} inputs, mode {guard.mode}: pass {result['pass']}, repaired {result['repaired']}, "
              f"rejected {result['rejected']}, flagged {result['flagged']}; accuracy of answers {acc}")
    return 1 if result["n"] - result["pass"] else 0
