"""Each online check on its own: the alibi-detect shape, calibration that holds on unseen clean data,
and separation of triggered from clean inputs (AUROC floors, PyOD style)."""

import inspect

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


# ---------------------------------------------------------------- scikit-learn's estimator conventions
# (docs/design.md): the constructor stores its parameters unchanged and computes nothing; what is
# learned ends in ``_`` and appears with fit / infer_threshold (or a profile restore); a profile's keys
# are the check's STATE / SETTINGS names, whatever the attributes are called.

def _convention_record(n=240, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 12)) * 3
    y = rng.integers(0, 3, n)
    f = (centres[y] + rng.normal(size=(n, 12))).astype(np.float32)
    g = (centres[y][:, :6] + rng.normal(size=(n, 6))).astype(np.float32)
    logits = (np.eye(3)[y] * 3 + rng.normal(size=(n, 3))).astype(np.float32)
    return Record(rng.random((n, 1, 4, 4)).astype(np.float32), logits, f, g), y


def _overlap_args():
    masks = np.zeros((2, 1, 4, 4), np.float32)
    masks[0, ..., :2, :2], masks[1, ..., 2:, 1:3] = 1.0, 0.7
    return (masks, np.random.default_rng(1).random((2, 1, 4, 4)).astype(np.float32)), {}


CONSTRUCT = {  # every registered check, with constructor arguments: a new check must be added here
    "feature": lambda: ((), {"shrinkage": 0.2}),
    "knn": lambda: ((), {"k": 4, "max_bank": 150, "seed": 3}),
    "inner_knn": lambda: ((), {"k": 3}),
    "consistency": lambda: ((), {}),
    "neuron": lambda: (([np.array([2, 5]), np.array([1, 7, 9])], 12), {}),
    "overlap": _overlap_args,
    "token": lambda: ((), {"blocks": 2, "quantile": 0.95}),
}


def _parameters(obj, args, kwargs) -> dict:
    """The constructor's parameters as it was called: the objects passed, else the defaults."""
    sig = inspect.signature(type(obj).__init__)
    bound = sig.bind(obj, *args, **kwargs)
    bound.apply_defaults()
    named = [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {k: bound.arguments[k] for k in named[1:]}  # no self; no *args of a check without a constructor


def _stored_unchanged(obj, args, kwargs, *, fitted=False):
    """Each parameter is the very object passed (or the default): nothing converted. Before fit the
    instance holds its parameters and nothing else: nothing computed, nothing learned."""
    given = _parameters(obj, args, kwargs)
    for k, v in given.items():
        assert vars(obj).get(k) is v, f"{type(obj).__name__}.{k} is not the object passed"
    if not fitted:
        learned = [k for k in dir(obj) if k.endswith("_") and not k.startswith("__") and hasattr(obj, k)]
        assert not learned, f"{type(obj).__name__}() has learned attributes before fit: {learned}"
        assert set(vars(obj)) == set(given), f"{type(obj).__name__}() set {sorted(set(vars(obj)) - set(given))}"


def test_the_convention_cases_cover_every_registered_check():
    assert set(CONSTRUCT) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_keeps_the_estimator_conventions(name):
    cls = CHECKS[name]
    args, kwargs = CONSTRUCT[name]()
    check = cls(*args, **kwargs)
    _stored_unchanged(check, args, kwargs)
    rec, y = _convention_record()
    fit, cal, test = rec.take(slice(0, 120)), rec.take(slice(120, 200)), rec.take(slice(200, None))
    with pytest.raises(RuntimeError, match="infer_threshold"):
        check.fit(fit, y[:120]).predict(test)
    _stored_unchanged(check, args, kwargs, fitted=True)
    check.infer_threshold(cal, fpr=0.05)
    learned = [k + "_" for k in (*cls.STATE, *cls.SETTINGS)] + ["threshold_", "fpr_"]
    assert all(hasattr(check, k) for k in learned), learned
    settings, tensors = check.to_profile()
    assert set(tensors) == set(cls.STATE) and set(settings) == {"threshold", *cls.SETTINGS}  # the profile's keys
    again = cls.from_profile(settings, tensors, fpr=0.05)
    assert all(hasattr(again, k) for k in learned)
    np.testing.assert_array_equal(again.score(test), check.score(test))
    assert (again.threshold_, again.fpr_) == (check.threshold_, check.fpr_)


def test_neuron_check_stores_its_neurons_as_given():
    neurons = [np.array([1, 2])]
    check = NeuronCheck(neurons, 8)
    assert check.neurons is neurons and check.dim == 8 and not hasattr(check, "weights_")


def test_knn_keeps_k_and_learns_the_clamped_one():
    """``k`` stays what was asked; ``k_`` is the one used (the bank is smaller than ``k`` here), and it
    is what the profile stores as ``k`` and a restored check reports as both."""
    from guard.online.checks import KNNCheck

    rec, _ = _convention_record(60)
    check = KNNCheck(k=50, max_bank=30).fit(rec.take(slice(0, 30))).infer_threshold(rec.take(slice(30, None)), fpr=0.1)
    assert (check.k, check.k_, check.params()[3]) == (50, 30, 30)
    settings, tensors = check.to_profile()
    assert settings["k"] == 30 and set(tensors) == {"bank_rows", "starts", "stops"}
    again = KNNCheck.from_profile(settings, tensors, fpr=0.1)
    assert (again.k, again.k_) == (30, 30)
    np.testing.assert_array_equal(again.score(rec), check.score(rec))


def test_ensemble_rules_keep_the_estimator_conventions():
    from guard.online.ensemble import FisherEnsemble, UnionRule

    rng = np.random.default_rng(0)
    cal, x = rng.normal(size=(200, 3)).astype(np.float32), rng.normal(size=(50, 3)).astype(np.float32)
    share = 0.2
    e = FisherEnsemble(tail_share=share)
    _stored_unchanged(e, (), {"tail_share": share})
    e.fit(cal, anomalies=cal[:30] + 1).infer_threshold(cal, fpr=0.05)
    _stored_unchanged(e, (), {"tail_share": share}, fitted=True)
    assert all(hasattr(e, k) for k in ("refs_", "t0_", "beta_", "weights_", "threshold_", "fpr_"))
    again = FisherEnsemble.from_profile(*e.to_profile(), fpr=0.05)
    np.testing.assert_array_equal(again.statistic(x), e.statistic(x))
    assert (again.threshold_, again.fpr_) == (e.threshold_, e.fpr_)
    with pytest.raises(ValueError, match="tail_share"):  # validated where it is used, not by the constructor
        FisherEnsemble(tail_share=0).fit(cal)

    thresholds = [0.5, -1.0, 2.0]
    u = UnionRule(thresholds)
    _stored_unchanged(u, (thresholds,), {})
    u.fit()
    _stored_unchanged(u, (thresholds,), {}, fitted=True)
    assert u.threshold_ == 0.0
    np.testing.assert_array_equal(u.statistic(x) > u.threshold_, (x > np.array(thresholds)).any(1))


def test_trigger_memory_keeps_the_estimator_conventions():
    from guard.online.memory import TriggerMemory

    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    kw = {"size": 8, "n_features": 16, "seed": 2}
    mem = TriggerMemory(**kw)
    _stored_unchanged(mem, (), kw)
    mem.fit(x)
    assert hasattr(mem, "index_") and not hasattr(mem, "threshold_")
    mem.infer_threshold(x, fpr=0.1)
    again = TriggerMemory.from_settings(mem.to_settings(), x.shape[1:])
    np.testing.assert_array_equal(again.score(x), mem.score(x))
    mem.fit(x)  # a new fit drops the old calibration
    assert not hasattr(mem, "threshold_") and not hasattr(mem, "fpr_")
