"""guard.bench.adaptive: the trigger variants are what they say, and the guard's detection floors on the
variants where it should still hold (measured on the demo BadNets model minus a margin).

Floors are on ``tpr_effective``, the share the guard flags among the stamped inputs the backdoor still
hijacks (a variant that no longer fires is harmless), at the profile's calibrated thresholds. Measured
on this world's first 400 held-out images (docs/hardening.md has the full table); the margins cover
the run-to-run spread we saw across other 400-image slices (up to 0.09 on ``shift +0,-2``).
"""

from __future__ import annotations

import numpy as np
import pytest

from guard import Guard, Profile, load_model
from guard.bench.adaptive import evaluate, operating_thresholds, to_markdown, variants
from guard.data import load_npz
from guard.demo.attacks import BadNets

# variant -> (floor on TPR among hijacked inputs, floor on attack success so the floor is not vacuous)
FLOORS = {
    "reference": (0.97, 0.95),
    "occlude 1/9 px": (0.93, 0.85),
    "scale 3->4 px": (0.95, 0.95),
    "opacity 0.75": (0.80, 0.70),
    "occlude 3/9 px": (0.80, 0.70),
    "shift -1,-1": (0.70, 0.30),
    "shift +0,-2": (0.45, 0.50),
    "scale 3->6 px": (0.65, 0.15),  # 0.85-0.92 on earlier demo builds, 0.75 on the seed-3 demo
}
# With the nearest-neighbour feature check in the profile (guard scan's default since KNNCheck) the guard
# also holds on fainter, half-hidden and resized triggers: measured 0.45-0.53 (opacity 0.5), 0.66-0.68
# (occlude 5/9), 0.71-0.79 (resize x0.75), 0.77-0.84 (shift +0,-2), 0.91 (shift -1,-1) over three slices
# of an earlier demo build; on the seed-3 demo: 0.68, 0.72, 0.82, 0.81, 0.77.
KNN_FLOORS = {
    "opacity 0.5": (0.30, 0.15),
    "occlude 5/9 px": (0.50, 0.30),
    "resize x0.75 and back": (0.55, 0.15),
    "shift +0,-2": (0.65, 0.50),
}
RESIDUAL_CEILING = {"shift -1,-1": 0.15, "shift +0,-2": 0.40, "occlude 3/9 px": 0.15, "opacity 0.75": 0.15}


def test_variants_stamp_what_they_say():
    atk = BadNets(target=6)
    x = np.full((2, 3, 32, 32), 0.5, dtype=np.float32)
    by = {v.name: v for v in variants(atk, (3, 32, 32))}
    ref = by["reference"].stamp(x)
    np.testing.assert_array_equal(ref, atk.stamp(x))
    changed = np.argwhere((ref != x).any(1)[0])
    r0, c0 = changed.min(0)
    shifted = by["shift -2,-2"].stamp(x)
    np.testing.assert_array_equal(shifted[:, :, r0 - 2:r0 + 1, c0 - 2:c0 + 1], ref[:, :, r0:r0 + 3, c0:c0 + 3])
    faint = by["opacity 0.5"].stamp(x)
    np.testing.assert_allclose(faint, 0.5 * x + 0.5 * ref)
    for k in (1, 3, 5):
        occluded = by[f"occlude {k}/9 px"].stamp(x)
        assert int(((occluded != ref).any(1)[0]).sum()) <= k  # k patch pixels left as the image
        assert int(((occluded != x).any(1)[0]).sum()) >= int(((ref != x).any(1)[0]).sum()) - k
    assert int(((by["scale 3->6 px"].stamp(x) != x).any(1)[0]).sum()) > int(((ref != x).any(1)[0]).sum())
    resized = by["resize x0.5 and back"].stamp(x)
    assert resized.shape == x.shape and 0 <= resized.min() and resized.max() <= 1


@pytest.fixture(scope="module")
def figures(demo_world, demo_profile) -> dict:
    guard = Guard(load_model(demo_world.model_file, demo_world.weights), Profile.load(demo_profile), mode="enforce")
    x, y = load_npz(demo_world.holdout)
    atk = BadNets(target=6)
    chosen = [v for v in variants(atk, tuple(x.shape[1:])) if v.name in FLOORS or v.name in KNN_FLOORS]
    assert len(chosen) == len(set(FLOORS) | set(KNN_FLOORS))
    xc, _ = load_npz(demo_world.clean)
    extra = operating_thresholds(guard, xc[:500], [0.05])
    return evaluate(guard, atk, x[:400], y[:400], variant_list=chosen, extra_thresholds=extra)


def test_guard_holds_on_near_variants_of_the_trigger(figures):
    rows = {r["variant"]: r for r in figures["variants"]}
    floors = {**FLOORS, **KNN_FLOORS} if "knn" in figures["thresholds"] else FLOORS
    low = {name: (rows[name]["tpr_effective"], floor) for name, (floor, _) in floors.items()
           if rows[name]["tpr_effective"] is None or rows[name]["tpr_effective"] < floor}
    assert not low, f"TPR among hijacked inputs below its floor: {low}\n{to_markdown(figures)}"
    weak = {name: rows[name]["attack_success"] for name, (_, asr) in floors.items()
            if rows[name]["attack_success"] < asr}
    assert not weak, f"variants that no longer attack (the floor would be vacuous): {weak}"
    high = {n: rows[n]["residual"] for n, ceiling in RESIDUAL_CEILING.items() if rows[n]["residual"] > ceiling}
    assert not high, f"attack success through the guard above its ceiling: {high}"
    assert figures["clean_fpr"] <= 0.04


def test_a_looser_operating_point_only_adds_detections(figures):
    """--fpr 0.05 thresholds are below the profile's: every variant's TPR among hijacked can only rise."""
    for r in figures["variants"]:
        assert r["tpr_effective_at"]["--fpr 0.05"] >= r["tpr_effective"] - 1e-9, r
    assert figures["clean_fpr_at"]["--fpr 0.05"] >= figures["clean_fpr"]
