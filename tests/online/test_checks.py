"""Each online check on its own: the alibi-detect shape, calibration that holds on unseen clean data,
and separation of triggered from clean inputs (AUROC floors, PyOD style)."""

import numpy as np
import pytest

from guard import Guard, Profile, load_model
from guard.data import load_npz
from guard.online import FeatureCheck, NeuronCheck, OverlapCheck, Record
from guard.online.checks import CHECKS, ConsistencyCheck
from guard.scan import records
from guard.stats import roc_auc, tpr_at_fpr, upper_threshold


@pytest.fixture(scope="module")
def recs(demo_world, demo_profile):
    model = load_model(demo_world.model_file, demo_world.weights)
    guard = Guard(model, Profile.load(demo_profile))
    clean = records(model, load_npz(demo_world.holdout)[0], inner=guard.inner)
    trig = records(model, load_npz(demo_world.triggered)[0], inner=guard.inner)
    return guard, clean, trig


@pytest.mark.parametrize("name,floor", [("feature", 0.99), ("knn", 0.95), ("neuron", 0.95),
                                        ("consistency", 0.95)])
def test_each_check_separates_the_demo_trigger(recs, name, floor):
    guard, clean, trig = recs
    check = guard.checks[guard.names.index(name)]
    assert roc_auc(check.score(clean), check.score(trig)) >= floor


def test_overlap_separates_where_the_mask_covers_the_trigger(recs, demo_world):
    """The overlap check is keyed on a mask's position. Given the real patch's footprint and pattern it
    separates perfectly; the demo's *reversed* mask lands mostly beside the real patch (a trigger
    that works, not the attacker's), so the profile's overlap check is weak there (printed, measured
    0.48 on the seed-3 demo) and the other checks carry the guard."""
    guard, clean, trig = recs
    atk = demo_world.attack
    true = OverlapCheck(atk.mask((3, 32, 32))[None], atk.stamp(np.zeros((1, 3, 32, 32), np.float32))).fit(clean)
    assert roc_auc(true.score(clean), true.score(trig)) >= 0.99
    reversed_ = guard.checks[guard.names.index("overlap")]
    print(f"\noverlap AUROC with the reversed mask: {roc_auc(reversed_.score(clean), reversed_.score(trig)):.3f}")


def test_calibration_holds_on_unseen_clean_images(recs):
    guard, clean, _ = recs
    s = guard.scores(clean)
    for j, check in enumerate(guard.checks):
        realised = (s[:, j] > check.threshold_).mean()
        assert realised <= 3 * check.fpr_ + 0.01, (check.name, realised, check.fpr_)
    assert guard.suspect(s).mean() <= 0.02  # the ensemble, calibrated at 1%


def test_combined_verdict_catches_the_trigger(recs):
    guard, clean, trig = recs
    assert guard.suspect(guard.scores(trig)).mean() >= 0.95


def test_alibi_shape_and_state_round_trip(recs):
    _, clean, trig = recs
    half = len(clean) // 2
    fit, cal = clean.take(slice(0, half)), clean.take(slice(half, None))
    check = FeatureCheck().fit(fit)
    assert check.infer_threshold(cal, fpr=0.05) is check
    assert check.threshold_ == pytest.approx(upper_threshold(check.score(cal), 0.05))
    assert check.predict(trig).mean() > 0.9
    again = CHECKS["feature"].from_profile(*check.to_profile(), fpr=0.05)
    np.testing.assert_array_equal(again.score(trig), check.score(trig))
    assert (again.threshold_, again.fpr_) == (check.threshold_, 0.05)


def test_neuron_and_overlap_checks_on_synthetic_records():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(400, 16)).astype(np.float32)
    x = rng.random((400, 1, 4, 4)).astype(np.float32)
    rec = Record(x, rng.normal(size=(400, 3)).astype(np.float32), f)
    n = NeuronCheck([np.array([2, 5])], 16).fit(rec)
    hot = Record(x[:50], rec.logits[:50], f[:50].copy())
    hot.features[:, [2, 5]] += 4
    assert roc_auc(n.score(rec), n.score(hot)) > 0.99
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., :2, :2] = 1
    pattern = np.ones((1, 1, 4, 4), np.float32)
    o = OverlapCheck(mask, pattern).fit(rec)
    stamped = x[:50].copy()
    stamped[..., :2, :2] = 1
    assert tpr_at_fpr(o.score(rec), o.score(Record(stamped, rec.logits[:50], f[:50])), 0.01) > 0.9


def test_consistency_check_scores_disagreement_between_the_inner_layer_and_the_label():
    """Zero where the inner layer's discriminant agrees with the model's label; positive, and growing
    with the distance, where the inner layer says another class."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4.0, size=(3, 8))
    y = np.repeat(np.arange(3), 100)
    inner = (centres[y] + rng.normal(size=(300, 8))).astype(np.float32)
    logits = np.eye(3, dtype=np.float32)[y]
    rec = Record(np.zeros((300, 1, 2, 2), np.float32), logits, np.zeros((300, 4), np.float32), inner)
    check = ConsistencyCheck().fit(rec, y)
    agree = check.score(rec)
    assert np.median(agree) == 0.0 and (agree >= 0).all()
    flipped = Record(rec.x, np.roll(logits, 1, axis=1), rec.features, inner)  # labels that the layer disputes
    assert roc_auc(agree, check.score(flipped)) > 0.99
    check.infer_threshold(rec, fpr=0.05)
    again = CHECKS["consistency"].from_profile(*check.to_profile(), fpr=0.05)
    np.testing.assert_array_equal(again.score(flipped), check.score(flipped))
    with pytest.raises(ValueError, match="inner layer"):
        ConsistencyCheck().fit(Record(rec.x, logits, rec.features), y)
