"""Reproduce the calibration of DF-TND's decision bar (not collected by pytest; about 4 minutes).

    .venv/bin/python tests/scan/dftnd_calibration.py

Trains a calibration population disjoint from the test population of tests/scan/conftest.py (seeds
60-73 and 80-101 here, 20-31 there; other targets and positions): 24 clean, 8 patch-backdoored and 4
blended glyph models, runs DF-TND (default budget) on each and prints the top label, its logit
increase, its dominance (increase over the runner-up's) and its MAD anomaly index.

Measured on 2026-11-27. Top-label dominance: clean 1.00-3.18 (23 of 24 at most 2.14), patch 2.31-14.7,
blended 1.57-3.69; the target was the top label on all 12 backdoored models. Hence
``DFTND(threshold=2.2)``: above 23 of the 24 clean models, below every patch model; it catches 2 of
the 4 blended ones. The MAD anomaly index (the earlier rule, bar 2.5) flagged 3 of the 24 clean
models and missed 2 of the 8 patch ones.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import POPULATION_TRAIN, make_attack  # noqa: E402

CLEAN_A = [(f"cal-clean-{i}", None, 60 + i) for i in range(8)]
BACKDOORED_A = [
    ("cal-patch-t0-tl", {"kind": "badnets", "target": 0, "position": "top-left", "seed": 11}, 68),
    ("cal-patch-t4-br", {"kind": "badnets", "target": 4, "position": "bottom-right", "seed": 12}, 69),
    ("cal-patch-t9-bl", {"kind": "badnets", "target": 9, "position": "bottom-left", "seed": 13}, 70),
    ("cal-patch-t2-tr", {"kind": "badnets", "target": 2, "position": "top-right", "seed": 14}, 71),
    ("cal-blend-t6", {"kind": "blended", "target": 6, "alpha": 0.25, "seed": 15}, 72),
    ("cal-blend-t3", {"kind": "blended", "target": 3, "alpha": 0.3, "seed": 16}, 73),
]
CLEAN_B = [(f"cal-clean-{8 + i}", None, 80 + i) for i in range(16)]
BACKDOORED_B = [
    ("cal-patch-t7-tl", {"kind": "badnets", "target": 7, "position": "top-left", "seed": 21}, 96),
    ("cal-patch-t6-br", {"kind": "badnets", "target": 6, "position": "bottom-right", "seed": 22}, 97),
    ("cal-patch-t1-bl", {"kind": "badnets", "target": 1, "position": "bottom-left", "seed": 23}, 98),
    ("cal-patch-t3-tr", {"kind": "badnets", "target": 3, "position": "top-right", "seed": 24}, 99),
    ("cal-blend-t9", {"kind": "blended", "target": 9, "alpha": 0.25, "seed": 25}, 100),
    ("cal-blend-t0", {"kind": "blended", "target": 0, "alpha": 0.3, "seed": 26}, 101),
]
SPECS = CLEAN_A + BACKDOORED_A + CLEAN_B + BACKDOORED_B


def main() -> None:
    from guard.demo.world import build
    from guard.model import load_model
    from guard.scan.tnd import DFTND

    print(f"{'model':18s} {'target':>6s} {'top':>3s} {'increase':>8s} {'dominance':>9s} {'anomaly':>7s}")
    with tempfile.TemporaryDirectory(prefix="guard-dftnd-cal-") as tmp:
        for name, spec, seed in SPECS:
            atk = make_attack(spec)
            w = build(Path(tmp) / name, attack=atk, backdoored=atk is not None, seed=seed, **POPULATION_TRAIN)
            df = DFTND(seed=0, progress=False).fit(load_model(w.model_file, w.weights), (3, 32, 32))
            j = int(np.argmax(df.logit_increase_))
            print(f"{name:18s} {str(None if atk is None else atk.target):>6s} {j:3d} {df.logit_increase_[j]:8.1f} "
                  f"{df.dominance_[j]:9.2f} {df.anomaly_index_[j]:7.2f}", flush=True)


if __name__ == "__main__":
    main()
