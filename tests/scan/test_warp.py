"""The warp reversal: its warp is a resampling (zero field = the image, a one-pixel field = a one-pixel
shift), its fields stay within their strength, it is seeded, it refuses bad settings and labels, and it
flags no label of the patch-backdoored demo model (a patch is not a warp) while the audit reports it.
Detection of warping backdoors is measured on the bench zoo (docs/benchmarks.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from guard.data import load_npz
from guard.errors import InputError
from guard.model import load_model
from guard.scan.reversal import leads
from guard.scan.warp import WarpReversal, smooth_field, warp


def test_a_zero_field_is_the_image_and_a_one_pixel_field_shifts_it_by_one_pixel():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(warp(x, torch.zeros(2, 2, 8, 8)), x)
    right = torch.zeros(2, 2, 8, 8)
    right[:, 0] = 1.0  # sample one pixel to the right: the content moves one pixel left
    torch.testing.assert_close(warp(x, right)[..., :-1], x[..., 1:])
    torch.testing.assert_close(warp(x, right)[..., -1], x[..., -1])  # the border repeats, no dark frame


def test_a_field_stays_within_its_strength():
    raw = 50 * torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    f = smooth_field(raw, 0.5, (32, 32))
    assert f.shape == (3, 2, 32, 32)
    assert float(f.abs().max()) <= 0.5 and float(f.abs().max()) > 0.4


def test_leads_measure_the_share_saved_over_the_easiest_other_label():
    np.testing.assert_allclose(leads(np.array([1.0, 2.0, 2.0, 4.0])), [0.5, -1.0, -1.0, -3.0])
    np.testing.assert_allclose(leads(np.array([2.0])), [0.0])


@pytest.fixture(scope="module")
def demo(badnets_world):
    model = load_model(badnets_world.model_file, badnets_world.weights)
    x, y = load_npz(badnets_world.clean)
    return model, x[:300], y[:300]


def test_the_patch_demo_model_is_not_a_warp_and_the_fit_is_seeded(demo):
    model, x, y = demo
    kw = dict(strengths=(0.5, 1.0, 2.0, 3.0), steps=40, refine_steps=15, seed=2, progress=False)
    a = WarpReversal(**kw).fit(model, x, y)
    b = WarpReversal(**kw).fit(model, x, y)
    np.testing.assert_array_equal(a.attack_success_, b.attack_success_)
    assert a.attack_success_.shape == (4, 10) and a.fields_.shape == (10, 2, 32, 32)
    assert float(np.abs(a.fields_).max()) <= 3.0
    assert a.suspect_labels_ == [] and a.lead_.max() < a.threshold, a.per_label()
    rows = a.per_label()
    assert len(rows) == 10 and set(rows[0]["attack_success"]) == {"0.5", "1", "2", "3"}


def test_bad_settings_and_labels_are_refused(demo):
    model, x, y = demo
    with pytest.raises(ValueError, match="strengths"):
        WarpReversal(strengths=(1.0, 0.5), progress=False).fit(model, x, y)
    with pytest.raises(ValueError, match="grid"):
        WarpReversal(grid=1, progress=False).fit(model, x, y)
    y2 = y.copy()
    y2[0] = 12
    with pytest.raises(InputError, match="the model has 10 classes"):
        WarpReversal(progress=False).fit(model, x, y2)


def test_warp_in_the_demo_audit(demo_audit, badnets_profile):
    """The demo audit runs with the scan's profile: the warp reversal's result comes from it (guard scan
    stored it) and is reported as reused."""
    from guard import Profile

    block = json.loads((demo_audit.out / "report.json").read_text())["warp"]
    assert block["suspect_labels"] == [] and block["decision"] == "clean"
    assert len(block["per_label"]) == 10 and block["threshold"] == WarpReversal().threshold
    stored = Profile.load(badnets_profile)
    assert block["source"] == "profile" and block["per_label"] == stored.warp.per_label
    html = (demo_audit.out / "report.html").read_text()
    assert 'id="warp-table"' in html and "Warp reversal (warping triggers) (reused from the profile)" in html
    assert "guard_audit_warp_lead{" in demo_audit.metrics.read_text()


def test_the_profile_keeps_the_fit_and_an_audit_without_it_fits_again(demo, tmp_path):
    """to_profile/set_warp round-trip through profile.json and safetensors; a profile without the warp
    result has no ``warp`` key at all, and run_audit then fits the reversal itself."""
    from guard import Profile
    from guard.audit.rollout import run_audit
    from guard.profile import CheckEntry

    model, x, y = demo
    wr = WarpReversal(strengths=(0.5, 2.0), steps=4, refine_steps=2, n_fit=20, n_eval=40, progress=False)
    wr.fit(model, x, y)
    p = Profile(model_sha256="0" * 64, input_shape=tuple(x.shape[1:]), num_classes=10, feature_layer="fc",
                fpr=0.01, checks={"feature": CheckEntry(threshold=1.0)})
    p.save(tmp_path / "bare")
    assert "warp" not in json.loads((tmp_path / "bare" / "profile.json").read_text())
    p.set_warp(*wr.to_profile())
    q = Profile.load(p.save(tmp_path / "with"))
    assert q.warp == p.warp and q.warp.per_label == wr.per_label() and q.warp.strengths == [0.5, 2.0]
    np.testing.assert_array_equal(q.tensors["warp.fields"], wr.fields_)
    res = run_audit(model, x, y, methods=("warp",), profile=q, progress=False)
    assert res.summary["warp"]["source"] == "profile" and res.summary["warp"]["per_label"] == wr.per_label()
    refit = run_audit(model, x, y, methods=("warp",), profile=Profile.load(tmp_path / "bare"), progress=False,
                      warp=WarpReversal(strengths=(0.5, 2.0), steps=4, refine_steps=2, n_fit=20, n_eval=40,
                                        progress=False))
    assert refit.summary["warp"]["source"] == "scan" and refit.summary["warp"]["per_label"] == wr.per_label()
