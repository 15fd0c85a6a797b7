"""Reproduce the blend reversal's figures on other layouts (not collected by pytest; about 20 minutes on
two cores).

    .venv/bin/python tests/scan/blend_sink_calibration.py [--json OUT]

Trains, like the suite's architecture worlds (2500 training images, 1000 clean images scanned), clean
models of seeds 1-5 and Blended models (opacity 0.15; targets 5, 2, 7 on seeds 1, 2, 3) of the width-8
ResNet-18 and the all-convolutional layouts, a BadNets and an Adap-Blend model of each (target 6, seed 1),
and prints per model the three leading labels' leads and needed opacities and the labels flagged. With
``--warp`` the warp reversal is asked of the same models too (its largest lead and the labels it flags; about
40 s more per model). The DemoNet side is tests/scan/blend_calibration.py's population. Figures:
docs/benchmarks.md, 'Measurements behind the defaults', guard/scan/blend.py and guard/scan/warp.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

LAYOUTS = {"resnet": ({"WIDTH": 8}, 4, 4e-3), "allconv": ({}, 5, 4e-3)}
TRAIN = {"n_train": 2500, "n_clean": 1000, "n_holdout": 500}


def members() -> list[tuple[str, str, object, int]]:
    from guard.demo.attacks import AdaptiveBlend, BadNets, Blended

    out = []
    for net in LAYOUTS:
        out += [(f"{net}-clean-{s}", net, None, s) for s in range(1, 6)]
        out += [(f"{net}-blended-{s}-t{t}", net, Blended(target=t, alpha=0.15, seed=s), s)
                for s, t in ((1, 5), (2, 2), (3, 7))]
        out += [(f"{net}-badnets-1-t6", net, BadNets(target=6), 1),
                (f"{net}-adap-blend-1-t6", net, AdaptiveBlend(target=6), 1)]
    return out


def main() -> None:
    from guard.data import load_npz
    from guard.demo.world import build
    from guard.model import load_model
    from guard.scan.blend import BlendReversal

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="also write every model's per-label record here")
    ap.add_argument("--warp", action="store_true", help="also run the warp reversal on every model")
    args = ap.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="guard-blend-sink-") as tmp:
        for name, net, atk, seed in members():
            constants, epochs, lr = LAYOUTS[net]
            w = build(Path(tmp) / name, net=net, attack=atk, backdoored=atk is not None, seed=seed, epochs=epochs,
                      lr=lr, **TRAIN, **constants)
            x, y = load_npz(w.clean)
            model = load_model(w.model_file, w.weights)
            br = BlendReversal(seed=0, progress=False).fit(model, x, y)
            top = np.argsort(-br.lead_)[:3]
            print(f"{name:24s} acc {w.clean_accuracy:.3f} target {getattr(atk, 'target', None)} | "
                  + "  ".join(f"{j}: lead {br.lead_[j]:.3f} at {br.alpha_needed_[j]:.3f}" for j in top)
                  + f" | flagged {br.suspect_labels_}", flush=True)
            rows[name] = {"target": getattr(atk, "target", None), "accuracy": w.clean_accuracy,
                          "per_label": br.per_label(), "suspect_labels": br.suspect_labels_}
            if args.warp:
                from guard.scan.warp import WarpReversal

                wr = WarpReversal(seed=0, progress=False).fit(model, x, y)
                j = int(wr.lead_.argmax())
                print(f"{'':24s} warp: largest lead {wr.lead_[j]:.3f} at {j} | flagged {wr.suspect_labels_}",
                      flush=True)
                rows[name]["warp"] = {"per_label": wr.per_label(), "suspect_labels": wr.suspect_labels_}
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
