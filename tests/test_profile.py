"""Profile: exact round trip, atomic replace, refusal of another model, a truncated or foreign file."""

import json

import numpy as np
import pytest

from guard import Profile, ProfileError, ProfileMismatch, fingerprint, load_model


def test_round_trip_is_exact(demo_profile, tmp_path):
    p = Profile.load(demo_profile)
    p.save(tmp_path / "copy")
    q = Profile.load(tmp_path / "copy")
    assert q.meta == p.meta
    assert sorted(q.tensors) == sorted(p.tensors)
    for k in p.tensors:
        assert q.tensors[k].dtype == p.tensors[k].dtype
        np.testing.assert_array_equal(q.tensors[k], p.tensors[k])


def test_bound_to_the_model(demo_profile, demo_world, clean_world):
    model = load_model(demo_world.model_file, demo_world.weights)
    Profile.load(demo_profile, model_sha256=fingerprint(model))
    other = load_model(clean_world.model_file, clean_world.weights)
    with pytest.raises(ProfileMismatch):
        Profile.load(demo_profile, model_sha256=fingerprint(other))


def test_save_replaces_atomically(demo_profile, tmp_path):
    p = Profile.load(demo_profile)
    target = tmp_path / "prof"
    p.save(target)
    p.meta["policy"] = {"mode": "shadow"}
    p.save(target)
    assert Profile.load(target).meta["policy"]["mode"] == "shadow"
    assert [x.name for x in tmp_path.iterdir()] == ["prof"]  # no temporary leftovers


def test_truncated_tensors_are_refused(demo_profile, tmp_path):
    Profile.load(demo_profile).save(tmp_path / "p")
    t = tmp_path / "p" / "tensors.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    with pytest.raises(ProfileError):
        Profile.load(tmp_path / "p")


def test_missing_and_foreign_profiles(tmp_path):
    with pytest.raises(ProfileError):
        Profile.load(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "profile.json").write_text("{not json")
    (tmp_path / "x" / "tensors.safetensors").write_bytes(b"")
    with pytest.raises(ProfileError):
        Profile.load(tmp_path / "x")


def test_schema_version_is_checked(demo_profile, tmp_path):
    Profile.load(demo_profile).save(tmp_path / "p")
    j = tmp_path / "p" / "profile.json"
    meta = json.loads(j.read_text())
    meta["schema_version"] = 999
    j.write_text(json.dumps(meta))
    with pytest.raises(ProfileMismatch):
        Profile.load(tmp_path / "p")
