"""Warping evidence for a purification: a reversed warp field is a trigger (every stamped image resampled
through it, nothing pasted anywhere), the profile's warp fields are read when Neural Cleanse named no label,
and :meth:`Evidence.gather` takes the first source that has evidence, in a stated order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from guard.errors import InputError
from guard.profile import Profile
from guard.purify import Evidence
from guard.purify.evidence import WARP_SPREAD
from guard.purify.triggers import Trigger, anywhere, stamp_one


def test_a_warping_trigger_resamples_the_image_and_has_no_footprint():
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(stamp_one(x, Trigger.warping(np.zeros((2, 8, 8))), g), x)
    right = np.zeros((2, 8, 8), np.float32)
    right[0] = 1.0  # one pixel to the right: the content moves one pixel left, the border repeats
    torch.testing.assert_close(stamp_one(x, Trigger.warping(right), g)[..., :-1], x[..., 1:])
    patch = Trigger.of(np.ones((1, 2, 2)), np.zeros((3, 2, 2)))
    kept = anywhere([(1, Trigger.warping(right)), (2, patch)])
    assert [s for s, _ in kept] == [2]  # a warp has no footprint to paste elsewhere
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        Trigger.warping(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="spread"):
        Trigger.warping(right, spread=0.5)
    wide = Trigger.warping(right, spread=2.0)  # the field scaled by a factor between 1/2 and 2, drawn from g
    shifts = [float((stamp_one(x, wide, g) - x).abs().mean()) for _ in range(20)]
    assert max(shifts) > 1.3 * min(shifts)


def _warp_result(labels: list[int], k: int = 10) -> dict:
    return {"threshold": 0.5, "suspect_labels": labels, "strengths": [0.25, 0.5], "grid": 4, "success": 0.5,
            "per_label": [{"label": j, "lead": 0.9 if j in labels else 0.0} for j in range(k)]}


@pytest.fixture
def profile(badnets_profile) -> Profile:
    return Profile.load(badnets_profile)


def test_the_profile_warp_fields_are_the_evidence_when_neural_cleanse_named_none(profile):
    shape = tuple(profile.input_shape[1:])
    fields = np.random.default_rng(0).uniform(-1, 1, (10, 2, *shape)).astype(np.float32)
    assert Evidence.gather(None, None, None, profile)[1] == {"source": "profile"}  # Neural Cleanse first
    assert Evidence.gather(None, None, None, profile)[0].kind == "patch"
    quiet = dataclasses.replace(profile, suspect_labels=[])
    quiet.set_warp(_warp_result([3]), fields)
    ev, source = Evidence.gather(None, None, None, quiet)  # nothing reversed again: model and data unused
    assert source == {"source": "profile-warp"} and ev.kind == "warp" and ev.labels == [3]
    np.testing.assert_array_equal(ev.fields[0], fields[3])
    (label, trig), = ev.triggers(jitter=0)  # as the candidates are scored: the field as found
    assert label == 3 and trig.field is not None
    assert [s for s, _ in ev.scoring()] == [3]  # no pasted-anywhere twin
    assert trig.spread == 1.0 and ev.triggers(jitter=2)[0][1].spread == WARP_SPREAD  # unlearned at several strengths
    quiet.set_warp(_warp_result([]), fields)  # the scan ran the warp reversal and flagged nothing
    ev, source = Evidence.gather(None, None, None, quiet, search=False)
    assert not ev and source == {"source": None}
    quiet.set_warp(_warp_result([12]), fields)
    with pytest.raises(InputError, match="outside the profile's 10 warp fields"):
        Evidence.gather(None, None, None, quiet)


def test_the_evidence_line_names_its_source():
    from guard.cli.purify import evidence_line

    assert "Neural Cleanse" in evidence_line({"source": "profile"})
    assert "warp fields" in evidence_line({"source": "profile-warp"})
    line = evidence_line({"source": "warp-reversal", "blend_reversal": {"suspect_labels": []},
                          "warp_reversal": {"suspect_labels": [6]}})
    assert "a warp reversal on the clean images flagged label(s) [6]" in line
    line = evidence_line({"source": None, "blend_reversal": {"suspect_labels": []},
                          "warp_reversal": {"suspect_labels": []}})
    assert "a warp reversal and a blend reversal flagged none" in line


def test_the_warp_reversal_is_asked_before_the_blend_reversal(profile, monkeypatch):
    """Without a stored warp result the warp reversal goes first (a blend reversal's natural sink would hide a
    warp); the blend reversal runs only when it flags nothing, and not at all with ``search=False``."""
    shape = tuple(profile.input_shape[1:])
    asked: list[str] = []

    def reversal(name, labels):
        def fake(cls, *a, **k):
            asked.append(name)
            if not labels:
                return cls(), {"suspect_labels": []}
            return cls.from_warps(labels, np.zeros((len(labels), 2, *shape), np.float32)), {"suspect_labels": labels}
        return classmethod(fake)

    quiet = dataclasses.replace(profile, suspect_labels=[], warp=None)
    monkeypatch.setattr(Evidence, "from_warp_reversal", reversal("warp", [4]))
    monkeypatch.setattr(Evidence, "from_blend_reversal", reversal("blend", [5]))
    ev, source = Evidence.gather(None, None, None, quiet)
    assert asked == ["warp"] and source["source"] == "warp-reversal" and ev.labels == [4]
    monkeypatch.setattr(Evidence, "from_warp_reversal", reversal("warp", []))
    asked.clear()
    ev, source = Evidence.gather(None, None, None, quiet)
    assert asked == ["warp", "blend"] and source["source"] == "blend-reversal" and ev.labels == [5]
    asked.clear()
    assert not Evidence.gather(None, None, None, quiet, search=False)[0] and asked == []
