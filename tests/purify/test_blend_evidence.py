"""Purifying a blended backdoor that the patch scan does not name: ``guard scan`` runs Neural Cleanse,
which looks for the smallest region and misses a whole-image key, so the profile names no suspect
label. The blend reversal on the clean images finds the target and a key to unlearn; the purified
model is judged with the attacker's real key (never shown) on test images nothing trained on."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from guard.bench.purification import per_class_subset
from guard.demo.train import attack_success
from guard.model import accuracy
from guard.purify.tuning import bare


@pytest.fixture(scope="module")
def blended(tmp_path_factory):
    from guard.data import load_npz
    from guard.demo.attacks import Blended
    from guard.demo.world import build
    from guard.model import load_model

    w = build(tmp_path_factory.mktemp("blended"), attack=Blended(target=6, alpha=0.2, seed=0))
    x, y = load_npz(w.clean)
    xt, yt = load_npz(w.holdout)
    model = load_model(w.model_file, w.weights)
    assert accuracy(model, xt, yt) >= 0.95 and attack_success(model, w.attack, xt, yt) >= 0.9
    xs, ys = per_class_subset(x, y, 20, seed=0)
    return model, w.attack, xs, ys, xt, yt


@pytest.fixture(scope="module")
def reversed_blend(blended):
    """The blend reversal's evidence on the 20-per-class subset (once for the tests that read it)."""
    from guard.purify import Evidence

    model, _, xs, ys, _, _ = blended
    return Evidence.from_blend_reversal(model, xs, ys, seed=0)


def test_blend_reversal_names_the_target_and_a_key(blended, reversed_blend):
    _, attack, xs, _, _, _ = blended
    evidence, info = reversed_blend
    assert evidence.labels == [attack.target] == info["suspect_labels"]
    mask = evidence.masks[0]
    assert mask.shape == (1, *xs.shape[2:]) and np.ptp(mask) == 0 and 0 < mask.max() <= 0.2  # one opacity
    assert evidence.patterns.shape == (1, *xs.shape[1:])
    assert info["lead"][attack.target] > info["threshold"]


def test_purify_unlearns_the_blend_key_when_the_profile_names_no_label(blended, badnets_profile):
    """purify() with a profile whose scan suspected nothing: the blend reversal supplies the evidence, the
    before verdict says so, the real key's success falls and the same reversal on the purified model no
    longer sees the target lead (figures with 20 images per class: docs/benchmarks.md, 'Purification');
    the floors leave room for other CPUs."""
    from guard.profile import Profile
    from guard.purify import purify
    from guard.purify.residual import blend_residual

    model, attack, xs, ys, xt, yt = blended
    profile = dataclasses.replace(Profile.load(badnets_profile), suspect_labels=[])
    r = purify(model, xs, ys, profile, method="bn-tune", seed=0, online=False, rescan=False)
    ev = r.details["evidence"]
    assert ev["source"] == "blend-reversal" and ev["blend_reversal"]["suspect_labels"] == [attack.target]
    assert r.before["verdict"] == "backdoored" and r.before["suspect_labels"] == [attack.target]
    assert r.ok
    purified = copy.deepcopy(model)
    bare(purified).load_state_dict(r.state_dict)
    asr0, asr1 = attack_success(model, attack, xt, yt), attack_success(purified, attack, xt, yt)
    drop = accuracy(model, xt, yt) - accuracy(purified, xt, yt)
    print(f"\nblended, blend-reversal evidence, bn-tune 20/class: real ASR {asr0:.3f} -> {asr1:.3f}, drop "
          f"{100 * drop:.1f}")
    assert asr1 <= 0.2
    assert drop <= 0.05
    assert r.details["residual"] is None  # rescan=False: judged here by the same reversal as purify's rescan
    res = blend_residual(purified, xs, ys, [attack.target], seed=0)
    assert res["method"] == "blend-reversal" and not res["suspected"]
    assert blend_residual(model, xs, ys, [attack.target], seed=0)["suspected"]  # the original still leads


def test_blend_evidence_is_reversed_again_as_a_blend(blended, reversed_blend):
    """A purification tuning on blend evidence asks the blend question again of the model it tunes: one key
    at the opacity the scan found, one at the opacity natural labels need, both full-image masks, recorded
    in the details and added to the triggers that score the candidates. On the backdoored model the key at
    the natural opacity still carries most images to the target."""
    from guard.purify.base import Candidates

    model, attack, xs, ys, _, _ = blended
    evidence, _ = reversed_blend
    assert evidence.kind == "blend" and 0 < evidence.masks.max() < evidence.natural_opacity < 0.5
    c = Candidates(xs, ys, evidence, selection=None, original=model, num_classes=10)
    found = c.rereverse(model, 1, seed=0)
    (rows,) = c.details["re_reversed_blend"]
    assert [r["label"] for r in rows] == [attack.target] * 2 == [label for label, _ in c.scoring]
    assert [r["opacity"] for r in rows] == sorted({round(float(evidence.masks.max()), 4), evidence.natural_opacity})
    assert [label for label, _ in found] == [attack.target] * 2
    assert all(t.mask.shape == (1, *xs.shape[2:]) and bool((t.mask == t.mask.max()).all()) for _, t in found)
    assert rows[1]["success"] >= 0.5
