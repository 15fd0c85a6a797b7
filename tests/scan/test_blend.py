"""The blend reversal: its statistic's building blocks, its result on the demo BadNets model (a patch
trigger, which it must leave to Neural Cleanse), and in the audit. Its detection floors on blended
and clean models are in test_population.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from guard.audit.rollout import combine
from guard.data import load_npz
from guard.errors import InputError
from guard.model import load_model
from guard.scan.blend import BlendReversal
from guard.scan.reversal import crossing
from guard.stats import largest_other


def test_crossing_interpolates_between_opacities_and_censors_at_the_last():
    alphas = np.array([0.1, 0.2, 0.3])
    success = np.array([[0.0, 0.6, 0.0, 0.0],
                        [0.4, 0.9, 0.2, 0.5],
                        [0.8, 1.0, 0.4, 0.9]])
    np.testing.assert_allclose(crossing(alphas, success, 0.5), [0.225, 0.1, 0.3, 0.2])


def test_largest_other_is_the_largest_of_the_other_labels():
    np.testing.assert_allclose(largest_other(np.array([0.1, 0.7, 0.3])), [0.7, 0.3, 0.7])
    np.testing.assert_allclose(largest_other(np.array([0.5, 0.5, 0.2])), [0.5, 0.5, 0.5])


def test_lead_flags_a_label_that_needs_far_less_opacity():
    est = BlendReversal(threshold=0.15)
    for needed, flagged in (([0.08, 0.11, 0.12, 0.13], [0]),   # 27% below the easiest other: blended target
                            ([0.12, 0.13, 0.13, 0.14], []),    # the labels rise together: a clean model
                            ([0.2, 0.2, 0.2, 0.2], [])):       # none reached within the grid (censored)
        est.alpha_needed_ = np.array(needed)
        est._decide()
        assert est.suspect_labels_ == flagged, needed
        assert est.lead_.argmax() == int(np.argmin(needed))


@pytest.fixture(scope="module")
def demo(badnets_world):
    model = load_model(badnets_world.model_file, badnets_world.weights)
    x, y = load_npz(badnets_world.clean)
    return model, x, y


def test_blend_reversal_leaves_a_patch_backdoor_alone_and_is_seeded(demo):
    model, x, y = demo
    kw = dict(alphas=(0.06, 0.1, 0.14, 0.18), steps=40, refine_steps=15, seed=3, progress=False)
    a = BlendReversal(**kw).fit(model, x, y)
    b = BlendReversal(**kw).fit(model, x, y)
    np.testing.assert_allclose(a.attack_success_, b.attack_success_)
    assert a.attack_success_.shape == (4, 10) and a.patterns_.shape == (10, 3, 32, 32)
    assert 0 <= a.patterns_.min() and a.patterns_.max() <= 1
    # success grows with opacity for every label (the patterns are carried from one opacity to the next)
    assert (np.diff(a.attack_success_, axis=0) >= -0.1).all()
    assert a.attack_success_[-1].mean() > 0.5  # the optimisation works: most labels reached at 0.18
    assert a.suspect_labels_ == []  # a patch trigger is Neural Cleanse's to find, not a blended one
    assert a.steps_ == 40 + 3 * 15


def test_blend_reversal_refuses_bad_opacities_and_foreign_labels(demo):
    model, x, y = demo
    with pytest.raises(ValueError, match="opacities"):
        BlendReversal(alphas=(0.0, 0.1)).fit(model, x, y)
    y2 = y.copy()
    y2[0] = 12
    with pytest.raises(InputError, match="the model has 10 classes"):
        BlendReversal(progress=False).fit(model, x, y2)


def test_blend_in_the_demo_audit(demo_audit):
    block = json.loads((demo_audit.out / "report.json").read_text())["blend"]
    assert block["suspect_labels"] == [] and block["decision"] == "clean"
    assert len(block["per_label"]) == 10 and block["threshold"] == BlendReversal().threshold
    assert all(set(r["attack_success"]) == {f"{a:g}" for a in block["alphas"]} for r in block["per_label"])


def test_the_calibrated_methods_decide_and_dl_tnd_alone_does_not():
    assert combine({"neural_cleanse": [], "df_tnd": [], "blend": [4]})[:2] == ("backdoored", [4])
    verdict, labels, rule = combine({"neural_cleanse": [3], "dl_tnd": [3], "df_tnd": [], "blend": [3]})
    assert (verdict, labels) == ("backdoored", [3])
    assert rule == "neural_cleanse flagged and blend flagged (dl_tnd agrees)"
    assert combine({"neural_cleanse": [1], "df_tnd": [1], "blend": [7]})[:2] == ("backdoored", [1, 7])
    # Neural Cleanse (isolation bar included) is calibrated too: its flag alone decides
    assert combine({"neural_cleanse": [3], "df_tnd": [], "blend": []})[:2] == ("backdoored", [3])
    # DL-TND alone among several: reported, not decisive
    verdict, labels, rule = combine({"neural_cleanse": [], "dl_tnd": [3], "df_tnd": [], "blend": []})
    assert (verdict, labels) == ("clean", []) and "dl_tnd [3]" in rule
    assert combine({"neural_cleanse": [3], "dl_tnd": []})[:2] == ("backdoored", [3])
    assert combine({"dl_tnd": [2], "neural_cleanse": []})[0] == "clean"
    assert combine({"dl_tnd": [2]})[:2] == ("backdoored", [2])
    assert combine({"blend": []})[0] == "clean" and combine({"blend": [5]})[:2] == ("backdoored", [5])
