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
    p.policy.mode = "shadow"
    p.save(target)
    assert Profile.load(target).policy.mode == "shadow"
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


def _as_schema_1(src, dst):
    """Rewrite a profile as the schema-1 layout: per-check and ensemble fpr, check order only in
    ``ensemble.checks`` (keys sorted), the knn check's k as a tensor."""
    from safetensors.numpy import load_file, save_file

    p = Profile.load(src)
    meta = p.to_json()
    order = list(meta["checks"])
    meta["schema_version"] = 1
    tensors = dict(load_file(str(src / "tensors.safetensors")))
    checks = {}
    for name, entry in meta["checks"].items():
        entry = dict(entry, fpr=meta["fpr"])
        if name == "knn":
            tensors["check.knn.k"] = np.array([entry.pop("k")], np.int64)
        checks[name] = entry
    meta["checks"] = checks
    meta["ensemble"] = dict(meta["ensemble"], fpr=meta["fpr"], checks=order)
    meta["tensor_names"] = sorted(tensors)
    dst.mkdir()
    (dst / "profile.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(tensors, str(dst / "tensors.safetensors"))
    return p


def test_schema_1_profiles_are_migrated_on_load(demo_profile, demo_world, tmp_path):
    from guard import Guard
    from guard.data import load_npz

    new = _as_schema_1(demo_profile, tmp_path / "v1")
    old = Profile.load(tmp_path / "v1")
    assert list(old.checks) == list(new.checks) != sorted(new.checks)  # the ensemble's order, not the keys'
    assert old.checks["knn"].settings == {"k": new.checks["knn"].settings["k"]} and "check.knn.k" not in old.tensors
    assert old.fpr == new.fpr and old.ensemble == new.ensemble
    model = load_model(demo_world.model_file, demo_world.weights)
    x = load_npz(demo_world.triggered)[0][:8]
    np.testing.assert_array_equal(Guard(model, old).run(x).scores, Guard(model, new).run(x).scores)
    old.save(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "profile.json").read_text())["schema_version"] == 2


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["checks"]["knn"].update(threshold="high"), "checks.knn.threshold must be a number"),
    (lambda m: m.update(fpr=0.7), "fpr must be in"),
    (lambda m: m.update(input_shape=[3, 32]), "input_shape must be three"),
    (lambda m: m["policy"].update(mode="block"), "policy.mode must be one of"),
    (lambda m: m["ensemble"].update(threshold=None), "ensemble.threshold must be a number"),
    (lambda m: m["scan"]["per_label"][0].update(l1_norm="x"), r"scan.per_label\[0\].l1_norm must be a number"),
    (lambda m: m.update(checks=[]), "checks must be an object"),
    (lambda m: m.update(bogus=1), "unknown field bogus$"),
    (lambda m: m.update(suspect_label=m.pop("suspect_labels")),
     r"unknown field suspect_label \(did you mean 'suspect_labels'\?\)"),
    (lambda m: m["scan"]["per_label"][1].update(suspekt=m["scan"]["per_label"][1].pop("suspect")),
     r"unknown field scan.per_label\[1\].suspekt \(did you mean 'suspect'\?\)"),
    (lambda m: m["policy"].update(mood="shadow"), r"unknown field policy.mood \(did you mean 'mode'\?\)"),
    (lambda m: m["scan"]["samples"].update(fit="10"), "scan.samples.fit must be an integer"),
    (lambda m: m["scan"]["per_label"][2].update(suspect=1), r"scan.per_label\[2\].suspect must be true or false"),
    (lambda m: m["calibration"].pop("realised_fpr"), "calibration.realised_fpr is missing"),
    (lambda m: m.update(model_sha256="A" * 64), "model_sha256 must be 64 lowercase hex digits"),
    (lambda m: m["warp"].update(threshold="x"), "warp.threshold must be a number"),
    (lambda m: m["warp"].pop("per_label"), "warp.per_label is missing"),
])
def test_a_malformed_field_is_named(demo_profile, tmp_path, edit, message):
    """One line naming the file and the field's path (exit code 2 on the CLI); unknown fields are refused
    with the close field name they may mean."""
    Profile.load(demo_profile).save(tmp_path / "p")
    j = tmp_path / "p" / "profile.json"
    meta = json.loads(j.read_text())
    edit(meta)
    j.write_text(json.dumps(meta))
    with pytest.raises(ProfileError, match=message) as e:
        Profile.load(tmp_path / "p")
    assert str(e.value).startswith(f"{j}: ") and "\n" not in str(e.value) and e.value.exit_code == 2


def test_check_and_ensemble_settings_stay_open(demo_profile):
    """A check's entry and the ensemble's carry their own settings: keys the schema does not know are kept."""
    q = Profile.load(demo_profile)
    meta = q.to_json()
    meta["checks"]["knn"]["new_setting"] = [1, "a"]
    meta["ensemble"]["new_setting"] = {"x": 1}
    p = Profile.from_json(meta, q.tensors)
    assert p.checks["knn"].settings["new_setting"] == [1, "a"] and p.ensemble.settings["new_setting"] == {"x": 1}
    assert p.to_json() == meta


def test_profile_docstring_example_runs():
    import doctest

    import guard.profile

    assert doctest.testmod(guard.profile, raise_on_error=True).failed == 0
