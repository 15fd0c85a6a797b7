"""Reproduce the calibration of Neural Cleanse's isolation bar (not collected by pytest; about 15 minutes).

    .venv/bin/python tests/scan/nc_calibration.py

Runs Neural Cleanse (the population's reduced budget, batches of 16) on the calibration population of
tests/scan/dftnd_calibration.py (24 clean, 8 patch-backdoored and 4 blended glyph models, disjoint
from the test population) and prints, for the cheapest label of each model, whether the MAD test
alone flags it, its anomaly indices and its isolation (its L1 norm over the cheapest natural label's,
:attr:`guard.scan.NeuralCleanse.isolation_`).

Measured on 2026-12-03 (2-core Xeon): the MAD test alone flagged 4 of the 24 clean models (and a
natural label beside the target on 2 patch models); the cheapest label's isolation was 0.72-1.00 on
the clean models and 0.21-0.42 at the target of every patch model (the target was the cheapest label
on all 8). Hence ``NeuralCleanse(isolation=0.6)``: no clean model flagged, every patch target kept.
Blended triggers are not small masks (isolation 0.9 and more); the blend reversal covers them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import POPULATION_TRAIN, make_attack  # noqa: E402
from dftnd_calibration import SPECS  # noqa: E402


def main() -> None:
    from guard.data import load_npz
    from guard.demo.world import build
    from guard.model import load_model
    from guard.scan import NeuralCleanse

    head = ("model", "target", "min", "l1", "raw", "log", "isol", "MAD")
    print(" ".join(f"{h:18s}" if i == 0 else f"{h:>6s}" for i, h in enumerate(head)) + " flagged")
    with tempfile.TemporaryDirectory(prefix="guard-nc-cal-") as tmp:
        for name, spec, seed in SPECS:
            atk = make_attack(spec)
            w = build(Path(tmp) / name, attack=atk, backdoored=atk is not None, seed=seed, **POPULATION_TRAIN)
            x, _ = load_npz(w.clean)
            nc = NeuralCleanse(seed=0, batch_size=16, progress=False).fit(load_model(w.model_file, w.weights), x)
            j = int(np.argmin(nc.l1_norms_))
            mad = bool(nc._outliers()[j])
            print(f"{name:18s} {str(None if atk is None else atk.target):>6s} {j:3d} {nc.l1_norms_[j]:6.1f} "
                  f"{nc.anomaly_index_[j]:5.2f} {nc.log_anomaly_index_[j]:5.2f} {nc.isolation_[j]:5.2f} "
                  f"{'yes' if mad else 'no':>4s} {nc.suspect_labels_}", flush=True)


if __name__ == "__main__":
    main()
