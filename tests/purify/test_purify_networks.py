"""Purification on networks other than the demo net, with 20 clean images per class: GapNet (BatchNorm,
global average pooling, 16x16 digits) and the CIFAR-style ResNet-18 layout at width 8 (BatchNorm,
residual blocks), each with a 3x3 BadNets patch. BatchNorm-aware tuning (the method of ``auto`` that
holds on these) is judged with the attacker's real trigger, which it never sees, on test images it
never sees; the models are trained once per session (quality floors asserted first) and scanned with
Neural Cleanse (100 rounds) on the same 200 clean images the purification gets, as a user with 20
images per class would."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.purification import per_class_subset
from guard.demo.train import attack_success
from guard.model import accuracy, fingerprint


@pytest.fixture(scope="module")
def resnet_world(arch_worlds):
    """The architecture tests' ResNet-18 layout world (tests/arch_helpers.py), trained once per session."""
    from guard.data import load_npz
    from guard.model import load_model

    w = arch_worlds["resnet"]
    x, y = load_npz(w.clean)
    xt, yt = load_npz(w.holdout)
    return load_model(w.model_file, w.weights), w.attack, x, y, xt, yt


@pytest.fixture(scope="module")
def gap(gap_world):
    w = gap_world
    return w.model, w.attack, w.x_train, w.y_train, w.x_test, w.y_test


def _scan_and_purify(model, attack, x, y):
    """Scan 20 clean images per class (Neural Cleanse, 100 rounds), purify with them, return the estimator."""
    from guard.purify import Evidence, NormTuning
    from guard.scan.neural_cleanse import NeuralCleanse

    xs, ys = per_class_subset(x, y, 20, seed=0)
    nc = NeuralCleanse(seed=0, max_rounds=100, progress=False).fit(model, xs, num_classes=10)
    labels = [int(s) for s in nc.suspect_labels_]
    assert attack.target in labels and len(labels) <= 2, (labels, nc.anomaly_index_, nc.log_anomaly_index_)
    evidence = Evidence(labels, nc.masks_[labels], nc.patterns_[labels])
    return NormTuning(seed=0, progress=False).fit(model, xs, ys, evidence=evidence)


def _judge(name, model, attack, r, xt, yt):
    purified = r.model_
    asr0, asr1 = attack_success(model, attack, xt, yt), attack_success(purified, attack, xt, yt)
    drop = accuracy(model, xt, yt) - accuracy(purified, xt, yt)
    print(f"\n{name} bn-tune, 20/class: real-trigger ASR {asr0:.3f} -> {asr1:.3f}, test accuracy drop "
          f"{100 * drop:.1f} points, held-out drop {100 * (r.accuracy_before_ - r.accuracy_after_):.1f}, "
          f"selected {r.selected_}, {r.seconds_:.0f}s")
    return asr1, drop


def test_gapnet_purification_removes_the_real_trigger(gap):
    """GapNet: tuning with batch statistics (then re-estimated) keeps the accuracy that fine-tuning under
    frozen statistics lost (13 points in the first epoch), and the triggers reversed again on the
    partly purified model finish what the scan's trigger started. Measured on a 2-core AMD EPYC with a
    full scan's trigger: 99.8% -> 0.0% at 1.5 points of test accuracy (539 images)."""
    model, attack, x, y, xt, yt = gap
    sha = fingerprint(model)
    r = _scan_and_purify(model, attack, x, y)
    assert fingerprint(model) == sha  # the caller's model is untouched
    assert r.ok_ and r.accuracy_before_ - r.accuracy_after_ <= 0.02 + 1e-9
    assert r.details_["bn_tune"]["batchnorm"] and r.details_["re_reversed_l1"]
    asr, drop = _judge("GapNet", model, attack, r, xt, yt)
    assert asr <= 0.10
    assert drop <= 0.035


def test_resnet_purification_removes_the_real_trigger(resnet_world):
    """ResNet-18 layout: bn-tune with 20 images per class takes most of the real trigger's success away at no
    measurable accuracy cost, and BatchNorm statistics are re-estimated, not left describing the layers before
    tuning. How much is left depends on the CPU's numerics: a few percent on one 2-core AMD EPYC, 27.2% (this
    seed; 48.6% / 28.5% with the subset, scan and tuning seeded 1 and 2) on another; the floor below holds on
    both with margin. The repair target (at most 5% with 20 images per class) is not met on this world
    everywhere: docs/benchmarks.md, 'The same method on another machine'."""
    model, attack, x, y, xt, yt = resnet_world
    assert accuracy(model, xt, yt) >= 0.9 and attack_success(model, attack, xt, yt) >= 0.9
    r = _scan_and_purify(model, attack, x, y)
    assert r.ok_ and r.accuracy_before_ - r.accuracy_after_ <= 0.02 + 1e-9
    asr, drop = _judge("ResNet18", model, attack, r, xt, yt)
    assert asr <= 0.5
    assert drop <= 0.03
    bn0 = dict(model.named_buffers())["bn1.running_mean"]
    bn1 = dict(r.model_.named_buffers())["bn1.running_mean"]
    assert not torch.equal(bn0, bn1)


def test_recalibration_restores_what_frozen_statistics_lose(gap):
    """Fine-tuning a BatchNorm model with frozen statistics moves its convolutions under them; one pass
    re-estimating the statistics on the same clean images recovers the accuracy (measured on GapNet
    with Adam at lr 1e-3, 2 epochs of 150 images: about 54% frozen, about 96% or more recalibrated)."""
    import copy

    from guard.purify.tuning import finetune_epochs

    model, _, x, y, xt, yt = gap
    xs, ys = per_class_subset(x, y, 15, seed=0)
    accs = {}
    for recal in (False, True):
        m = copy.deepcopy(model)
        for _ in finetune_epochs(m, xs, ys, epochs=2, lr=1e-3, recalibrate=recal, progress=False):
            pass
        accs[recal] = accuracy(m, xt, yt)
    print(f"\nfrozen {accs[False]:.3f}, recalibrated {accs[True]:.3f}")
    assert accs[True] >= 0.95 and accs[True] - accs[False] >= 0.1


def test_bound_holds_on_a_batchnorm_model(gap):
    """A purification that would wreck the model (Adam at lr 0.1) is refused rather than reported: no state over
    the held-out bound is ever selected."""
    from guard.purify import Evidence, NCUnlearning

    model, attack, x, y, xt, yt = gap
    xs, ys = per_class_subset(x, y, 20, seed=0)
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 16, 16), np.float32)
    mask[0, :3, :3] = 1
    pattern = rng.random((1, 16, 16)).astype(np.float32)
    r = NCUnlearning(lr=0.1, epochs=2, seed=0, progress=False).fit(
        model, xs, ys, evidence=Evidence([attack.target], mask[None], pattern[None]))
    kept = [h for h in r.history_[1:] if h["within"]]
    if r.ok_:
        assert r.accuracy_before_ - r.accuracy_after_ <= 0.02 + 1e-9
    else:
        assert r.model_ is None and r.state_dict_ is None and not kept
    assert all(r.accuracy_before_ - h["clean_accuracy"] > 0.02 for h in r.history_[1:] if not h["within"])
