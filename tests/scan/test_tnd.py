"""DL-TND and DF-TND: quality on the demo BadNets model, their building blocks, and input refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guard.data import load_npz
from guard.errors import InputError
from guard.model import load_model
from guard.scan.tnd import DFTND, DLTND, margin, per_class_subset, project_simplex, soft_threshold


@pytest.fixture(scope="module")
def demo(badnets_world):
    model = load_model(badnets_world.model_file, badnets_world.weights)
    x, y = load_npz(badnets_world.clean)
    return model, x, y


def _dl_tnd_block(demo_audit) -> dict:
    return json.loads((demo_audit.out / "report.json").read_text())["dl_tnd"]


def test_dl_tnd_in_the_audit_uses_at_most_five_images_per_class(demo_audit):
    block = _dl_tnd_block(demo_audit)
    scores = np.array([r["similarity_q25"] for r in block["per_label"]])
    print(f"\nDL-TND q25 similarity per label: {np.round(scores, 3).tolist()} ({block['seconds']:.1f}s)")
    assert block["threshold"] == 0.75 and block["samples_per_class"] == 5
    assert scores.shape == (10,) and np.isfinite(scores).all() and (np.abs(scores) <= 1 + 1e-6).all()
    assert block["suspect_labels"] == [i for i, v in enumerate(scores) if v > 0.75]


@pytest.mark.xfail(strict=False, reason="known limit: DL-TND does not rank the target reliably on the glyph "
                   "world; measured target q25 0.88, 0.73, -0.26 and 0.71 (3rd) on four demo builds")
def test_dl_tnd_ranks_the_demo_target_high(demo_audit):
    """The paper's claim on the demo BadNets model: the target's similarity is high and ranks first or
    second. It held on two of four demo builds measured, which is why DL-TND never decides a verdict
    alone (guard.audit.rollout)."""
    scores = np.array([r["similarity_q25"] for r in _dl_tnd_block(demo_audit)["per_label"]])
    assert scores[6] > 0.7
    assert 6 in np.argsort(-scores)[:2]
    assert np.median(np.delete(scores, 6)) < 0.5  # most labels are far below the bar


def test_dl_tnd_estimator_shapes(demo):
    model, x, y = demo
    est = DLTND(seed=0, labels=[6, 0], search_steps=2, iterations=5, per_image_iterations=5,
                progress=False)
    assert est.fit(model, x, y) is est
    assert est.labels_ == [6, 0] and est.score_.shape == (2,)
    # one similarity per image not of the label, NaN for the label's own images
    assert est.similarity_.shape == (2, 50) and np.isnan(est.similarity_).sum() == 10
    assert est.masks_.shape == (2, 1, 32, 32) and est.patterns_.shape == (2, 3, 32, 32)
    assert ((est.masks_ >= 0) & (est.masks_ <= 1)).all()


def test_df_tnd_needs_no_data_and_is_seeded(demo):
    model, _, _ = demo
    a = DFTND(seed=1, iterations=15, progress=False).fit(model, (3, 32, 32))
    b = DFTND(seed=1, iterations=15, progress=False).fit(model)  # shape probed from the model
    np.testing.assert_allclose(a.logit_increase_, b.logit_increase_, rtol=1e-5, atol=1e-5)
    assert a.logit_increase_.shape == (10,) and a.mask_.shape == (1, 32, 32) and a.pattern_.shape == (3, 32, 32)
    assert abs(a.weights_.sum() - 1) < 1e-5 and (a.weights_ >= 0).all()
    assert 0.0 <= a.mask_.min() and a.mask_.max() <= 1.0


def test_building_blocks():
    v = torch.tensor([0.3, -0.2, 2.0, 0.05])
    torch.testing.assert_close(soft_threshold(v, torch.tensor(0.1)), torch.tensor([0.2, 0.0, 1.0, 0.0]))
    w = project_simplex(torch.tensor([0.5, 2.0, -1.0, 0.7]))
    assert abs(float(w.sum()) - 1) < 1e-6 and (w >= 0).all() and int(w.argmax()) == 1
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    torch.testing.assert_close(margin(logits, torch.tensor([1, 2])), torch.tensor([1.0, -4.0]))


def test_dl_tnd_refuses_too_few_samples_and_foreign_labels(demo):
    model, x, y = demo
    keep = np.concatenate([np.flatnonzero(y == c)[:1 if c == 2 else 5] for c in range(10)])
    with pytest.raises(InputError, match="at least 3"):
        DLTND(progress=False).fit(model, x[keep], y[keep])
    y2 = y.copy()
    y2[0] = 11
    with pytest.raises(InputError, match="but the model has 10 classes"):
        DLTND(progress=False).fit(model, x, y2)
    xs, ys = per_class_subset(x, y, 10, 5, minimum=3, seed=0)
    assert np.bincount(ys).tolist() == [5] * 10 and len(xs) == 50


def test_df_tnd_flags_the_top_label_only_when_it_dominates_the_runner_up():
    from guard.scan.tnd import dominance

    np.testing.assert_allclose(dominance(np.array([1.0, 10.0, 5.0])), [0.1, 2.0, 0.5])
    np.testing.assert_allclose(dominance(np.array([5.0, -3.0, 0.2])), [5.0, -0.6, 0.04])  # runner-up floored at 1
    est = DFTND(threshold=1.5, min_increase=10.0)
    for inc, flagged in (([40.0, 20.0, 5.0], [0]),    # twice the runner-up: a backdoor's shape
                         ([30.0, 25.0, 5.0], []),     # the easiest labels rise together: a clean model's
                         ([8.0, 1.0, 0.0], []),       # dominant but under min_increase
                         ([-2.0, 15.0, 9.0], [1])):
        est.logit_increase_ = np.array(inc)
        est.dominance_ = dominance(est.logit_increase_)
        assert est._flag() == flagged, inc
