"""Reproduce the calibration of the blend reversal's bar (not collected by pytest; about 15 minutes).

    .venv/bin/python tests/scan/blend_calibration.py [--json OUT]

Trains the calibration population of tests/scan/dftnd_calibration.py (24 clean, 8 patch-backdoored,
4 blended glyph models; seeds disjoint from the test population of tests/scan/conftest.py), audits
each with the population's reduced budget (:func:`conftest.quick_estimators`) plus the blend reversal
(default budget), and prints per model the blend scan's leading label, its lead and the opacity it
needs, next to each method's flags and the combined verdict.

Measured on 2026-11-27 (with the bar at 0.15; the figures set it to 0.175): the top lead was
0.006-0.124 on the 24 clean models and 0.227-0.330 on the 4 blended ones (always their target);
patch targets 0.159 and 0.163 on two of the 8 patch models, in the pack on the others. Verdict rules
on this population: DF-TND or the blend reversal deciding, 35 of 36 right (one clean model flagged by
DF-TND); with Neural Cleanse corroborated by DL-TND or by DF-TND's top-ranked label deciding too, 33
of 36 (two more clean models called backdoored, no backdoor gained). Hence
:func:`guard.audit.rollout.combine`. Blend reversal 5.3-10.3 s per model (median 5.8 s).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import POPULATION_TRAIN, make_attack, quick_estimators  # noqa: E402
from dftnd_calibration import SPECS  # noqa: E402


def main() -> None:
    from guard.audit.rollout import run_audit
    from guard.data import load_npz
    from guard.demo.world import build
    from guard.model import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, help="also write every model's audit summary here")
    args = ap.parse_args()
    rows = {}
    print(f"{'model':18s} {'target':>6s} {'top':>3s} {'lead':>6s} {'alpha':>6s} | nc / dl-tnd / df-tnd / blend "
          "| verdict")
    with tempfile.TemporaryDirectory(prefix="guard-blend-cal-") as tmp:
        for name, spec, seed in SPECS:
            atk = make_attack(spec)
            w = build(Path(tmp) / name, attack=atk, backdoored=atk is not None, seed=seed, **POPULATION_TRAIN)
            model = load_model(w.model_file, w.weights)
            x, y = load_npz(w.clean)
            est = quick_estimators(seed=0)
            s = run_audit(model, x, y, seed=0, progress=False, **{k: v for k, v in est.items()}).summary
            per = s["blend"]["per_label"]
            j = int(np.argmax([r["lead"] for r in per]))
            flags = " / ".join(str(s[m]["suspect_labels"]) for m in ("neural_cleanse", "dl_tnd", "df_tnd", "blend"))
            print(f"{name:18s} {str(None if atk is None else atk.target):>6s} {j:3d} {per[j]['lead']:6.3f} "
                  f"{per[j]['alpha']:6.3f} | {flags} | {s['verdict']}", flush=True)
            rows[name] = {"target": None if atk is None else atk.target, "summary": s}
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
