"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_model_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The model's arguments; ``required=False`` where the command can name its models another way
    (``guard audit --models``), which then checks them itself."""
    g = p.add_argument_group("model")
    g.add_argument("--model-file", required=required, help="Python file defining the nn.Module class")
    g.add_argument("--model-class", help="class to use when the file defines several")
    g.add_argument("--weights", required=required, help="state_dict file (loaded with weights_only=True)")
    g.add_argument("--normalize", metavar="MEAN,STD",
                   help="normalisation the model expects, applied inside guard's wrapper (e.g. 0.5,0.25)")
    g.add_argument("--feature-layer", metavar="NAME",
                   help="module whose input is the feature vector (default: the last nn.Linear, else the "
                        "classifier a probe forward finds, e.g. a 1x1 convolution before global pooling)")


def fetch_registered(args: argparse.Namespace):
    """The registered version ``args.model_uri`` names, fetched (``guard audit`` and ``guard archive``);
    InputError for a URI that is not a registry's or given beside ``--model-file``/``--weights``."""
    from guard.errors import InputError
    from guard.registry.mlflow_registry import fetch, is_registry_uri

    if not is_registry_uri(args.model_uri):
        raise InputError(f"MODEL_URI must be models:/NAME/VERSION or models:/NAME@ALIAS, got {args.model_uri!r} "
                         "(a local model takes --model-file and --weights)")
    if args.model_file or args.weights:
        raise InputError("MODEL_URI names the model: leave out --model-file and --weights")
    return fetch(args.model_uri, tracking_uri=args.tracking_uri)


def load_model_from(args: argparse.Namespace):
    """The model the arguments name; when the file defines several classes, say on stderr which one was
    picked and why (the choice is recorded in the profile and the archive)."""
    from guard.model import load_model

    notes: list[str] = []
    model = load_model(args.model_file, args.weights, model_class_name=args.model_class,
                       normalize=args.normalize, notes=notes)
    for note in notes:
        print(f"guard {getattr(args, 'command', '')}: {note} (--model-class overrides)".replace("  ", " "),
              file=sys.stderr)
    return model


def model_class_name(model) -> str:
    """The user's class name of a loaded model (inside guard's normalisation wrapper if any)."""
    from guard.model import Normalized

    return type(model.model if isinstance(model, Normalized) else model).__name__


def open_interval(low: float, high: float):
    """An argparse type: a number strictly between ``low`` and ``high`` (one readable error otherwise)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low < v < high:
            raise argparse.ArgumentTypeError(f"must be in ({low:g}, {high:g}), got {v}")
        return v

    return parse


fpr_arg = open_interval(0, 0.5)


def label_list(text: str) -> list[int]:
    """An argparse type: comma-separated class labels, each an integer >= 0 (one readable error otherwise)."""
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of labels: {text!r}") from None
    if not labels or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"labels are integers >= 0, got {text!r}")
    return labels


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def parse_device(text: str) -> str:
    """``--device``: ``cpu`` or an available ``cuda[:N]``, else one clear InputError (exit 2)."""
    import torch

    from guard.errors import InputError

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device must be cpu or cuda[:N], got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text}: this torch build ({torch.__version__}) sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)
