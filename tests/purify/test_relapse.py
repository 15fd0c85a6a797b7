"""The relapse probe: a short re-tuning poisoned with the reversed triggers brings a backdoor the model still
holds back, and teaches a model without one nothing in one epoch; the model probed is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.purification import per_class_subset
from guard.data import load_npz
from guard.model import fingerprint, load_model
from guard.profile import Profile
from guard.purify import Evidence
from guard.purify.relapse import SHALLOW, poisoned_copy, relapse, shallow_note
from guard.purify.triggers import Trigger


@pytest.fixture(scope="module")
def probe(demo_world, demo_profile, clean_world):
    x, y = load_npz(demo_world.clean)
    xs, ys = per_class_subset(x, y, 20, seed=0)
    xv, yv = load_npz(demo_world.holdout)
    trigs = Evidence.from_profile(Profile.load(demo_profile)).triggers(jitter=0)
    backdoored = load_model(demo_world.model_file, demo_world.weights)
    clean = load_model(clean_world.model_file, clean_world.weights)
    return backdoored, clean, xs, ys, xv[:400], yv[:400], trigs


def test_the_poisoned_copy_stamps_a_share_of_other_labels_images_and_relabels_them():
    x = np.random.default_rng(0).random((200, 3, 8, 8), dtype=np.float32)
    y = np.arange(200) % 4
    mask = np.zeros((1, 8, 8), np.float32)
    mask[:, :2, :2] = 1
    trigs = [(1, Trigger.of(mask, np.ones((3, 8, 8), np.float32))),
             (3, Trigger.of(mask, np.zeros((3, 8, 8), np.float32)))]
    xp, yp = poisoned_copy(x, y, trigs, rate=0.05, seed=1)
    changed = np.flatnonzero(np.any(xp != x, axis=(1, 2, 3)))
    assert len(changed) == 10 and np.array_equal(changed, np.flatnonzero(yp != y))
    assert set(yp[changed].tolist()) == {1, 3} and not np.any(y[changed] == yp[changed])
    assert np.all(xp[changed[yp[changed] == 1]][:, :, :2, :2] == 1)
    assert np.all(xp[changed[yp[changed] == 3]][:, :, :2, :2] == 0)
    np.testing.assert_array_equal(xp[:, :, 2:, 2:], x[:, :, 2:, 2:])  # nothing outside the mask moves
    one, _ = poisoned_copy(x, y, trigs, rate=0.001, seed=1)
    assert int(np.any(one != x, axis=(1, 2, 3)).sum()) == 2, "at least one image per trigger"
    assert relapse(torch.nn.Flatten(), x, y, x, y, [], seed=0) is None


def test_a_relapse_over_the_bar_says_the_repair_may_be_shallow():
    assert shallow_note(0.9, SHALLOW - 0.01) is None and shallow_note(None, None) is None
    note = shallow_note(0.9, 0.5)
    assert "back to 50%" in note and "original model: 90%" in note and "--method" in note
    assert "original" not in shallow_note(None, 0.5)


def test_a_backdoor_relapses_and_a_clean_model_learns_nothing_in_one_epoch(probe):
    backdoored, clean, xs, ys, xv, yv, trigs = probe
    assert [lab for lab, _ in trigs] == [6]
    sha = fingerprint(backdoored)
    held = relapse(backdoored, xs, ys, xv, yv, trigs, seed=0)
    assert fingerprint(backdoored) == sha, "the probed model is not changed"
    fresh = relapse(clean, xs, ys, xv, yv, trigs, seed=0)
    print(f"\nrelapse: backdoored {held:.3f}, its clean twin {fresh:.3f}")
    assert held >= 0.9
    assert fresh <= 0.3
