"""CLI contract: every subcommand listed, exit codes 0/1/2/3, one readable line on bad input."""

import json
import subprocess
import sys

import numpy as np

from guard.cli import COMMANDS
from guard.data import load_npz


def guard(*args):
    return subprocess.run([sys.executable, "-m", "guard.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def model_args(world):
    return ["--model-file", world.model_file, "--weights", world.weights]


def one_line_error(p, code):
    assert p.returncode == code, (p.returncode, p.stderr[-500:])
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_help_lists_every_subcommand():
    out = guard("--help").stdout
    for cmd in COMMANDS:
        assert cmd in out


def test_scan_json_and_exit_code(demo_scan):
    p = demo_scan.proc  # guard scan --json of the demo model (tests/conftest.py)
    assert p.returncode == 1, p.stderr[-500:]
    summary = json.loads(p.stdout)
    assert summary["suspect_labels"] == [6] and summary["verdict"] == "backdoored"
    assert set(summary["anomaly_index"]) == {str(i) for i in range(10)}
    assert summary["warp"]["suspect_labels"] == [] and len(summary["warp"]["lead"]) == 10  # a patch is no warp
    assert summary["profile"] == str(demo_scan.profile)
    stored = json.loads((demo_scan.profile / "profile.json").read_text())["warp"]  # audit --profile reuses it
    assert stored["suspect_labels"] == [] and [r["lead"] for r in stored["per_label"]] == \
        [summary["warp"]["lead"][str(j)] for j in range(10)]
    assert (demo_scan.profile / "profile.json").exists() and (demo_scan.profile / "tensors.safetensors").exists()


def test_scan_watches_what_an_earlier_profile_suspected(demo_world, demo_profile, tmp_path, here):
    """The rescan of a purified model keeps its trigger memory on the attacked model's suspects."""
    x, y = load_npz(demo_world.clean)
    small = tmp_path / "small.npz"
    np.savez(small, x=x[:200], y=y[:200])
    base = ("scan", *model_args(demo_world), "--data", small, "--max-rounds", "2", "--no-warp")
    p = guard(*base, "--out", tmp_path / "p", "--watch", "2", "--watch-from", demo_profile, "--json")
    assert p.returncode in (0, 1), p.stderr
    earlier = json.loads((demo_profile / "profile.json").read_text())
    assert 6 in earlier["suspect_labels"]
    assert set(json.loads(p.stdout)["memory"]["labels"]) >= {2, 6}
    assert set(json.loads((tmp_path / "p" / "profile.json").read_text())["memory"]["labels"]) >= {2, 6}
    for bad in (["--watch", "two"], ["--watch", "-1"], ["--watch", "10"], ["--watch-from", tmp_path / "none"],
                ["--watch", "2", "--memory", "off"], ["--adaptive-steps", "-1"]):
        one_line_error(here(*base, "--out", tmp_path / "o", *bad), 2)
    assert not (tmp_path / "o").exists()


def test_scan_device_is_checked_before_any_work(demo_world, tmp_path, here):
    import torch

    for i, dev in enumerate(("tpu", "cuda:99") + (() if torch.cuda.is_available() else ("cuda",))):
        p = (guard if i == 0 else here)("scan", *model_args(demo_world), "--data", demo_world.clean, "--out",
                                        tmp_path / "p", "--device", dev)
        one_line_error(p, 2)
        assert "--device" in p.stderr
    assert not (tmp_path / "p").exists()


def test_check_counts_verdicts(demo_world, demo_profile):
    p = guard("check", "--profile", demo_profile, *model_args(demo_world), "--data", demo_world.triggered, "--json")
    assert p.returncode == 1
    r = json.loads(p.stdout)
    assert r["rejected"] >= 0.95 * r["n"]
    p = guard("check", "--profile", demo_profile, *model_args(demo_world), "--data", demo_world.holdout, "--json")
    r = json.loads(p.stdout)
    assert r["pass"] >= 0.97 * r["n"] and r["accuracy"] >= 0.9


def test_bad_inputs_exit_2_with_one_line(demo_world, tmp_path, here):
    """Every bad input: exit 2, one line. The first case runs as a process, the others in this one."""
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3, 7, 7), np.float32), y=np.zeros(4, np.int64))
    one_line_error(guard("scan", *model_args(demo_world), "--data", bad, "--out", tmp_path / "o"), 2)
    missing = tmp_path / "missing.npz"
    one_line_error(here("scan", *model_args(demo_world), "--data", missing, "--out", tmp_path / "o"), 2)
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((4, 3, 32, 32), np.nan, np.float32), y=np.zeros(4, np.int64))
    one_line_error(here("scan", *model_args(demo_world), "--data", nan, "--out", tmp_path / "o"), 2)
    rng = tmp_path / "range.npz"
    np.savez(rng, x=np.full((4, 3, 32, 32), 3.0, np.float32), y=np.zeros(4, np.int64))
    one_line_error(here("scan", *model_args(demo_world), "--data", rng, "--out", tmp_path / "o"), 2)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not an npz")
    one_line_error(here("scan", *model_args(demo_world), "--data", junk, "--out", tmp_path / "o"), 2)
    nomod = tmp_path / "m.py"
    nomod.write_text("import torch\n")
    one_line_error(here("scan", "--model-file", nomod, "--weights", demo_world.weights, "--data", demo_world.clean,
                        "--out", tmp_path / "o"), 2)
    one_line_error(here("scan", *model_args(demo_world), "--data", demo_world.clean, "--out", tmp_path / "o",
                        "--fpr", "2"), 2)
    x, y = load_npz(demo_world.clean)
    few = tmp_path / "few.npz"  # class 3 has one image: the scan refuses, names it and says what helps
    keep = np.concatenate([np.flatnonzero(y != 3)[:120], np.flatnonzero(y == 3)[:1]])
    np.savez(few, x=x[keep], y=y[keep])
    p = here("scan", *model_args(demo_world), "--data", few, "--out", tmp_path / "o")
    one_line_error(p, 2)
    assert "1 of 10 classes have fewer than 2 clean images (class (images): 3 (1))" in p.stderr
    assert "--min-per-class" in p.stderr
    one_line_error(here("scan", *model_args(demo_world), "--data", few, "--out", tmp_path / "o",
                        "--min-per-class", "-1"), 2)
    assert not (tmp_path / "o").exists()


def test_profile_of_another_model_exits_3(clean_world, demo_profile):
    p = guard("check", "--profile", demo_profile, *model_args(clean_world), "--data", clean_world.holdout)
    one_line_error(p, 3)
    p = guard("inspect", demo_profile, *model_args(clean_world))
    one_line_error(p, 3)


def test_inspect_verifies(demo_world, demo_profile):
    p = guard("inspect", demo_profile, *model_args(demo_world), "--json")
    assert p.returncode == 0
    meta = json.loads(p.stdout)
    assert meta["verified"] and meta["suspect_labels"] == [6]
    assert meta["warp"]["suspect_labels"] == []  # guard scan stored the warp reversal's result
    text = guard("inspect", demo_profile).stdout
    assert "warp reversal: suspect labels none (largest lead" in text and "suspect labels: [6]" in text
    assert meta["memory"]["labels"] == [6] and "trigger memory: watches labels [6] at fpr 0.01" in text


def test_usage_errors_exit_2(here):
    p = guard("scan")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    for argv in (["check", "--profile"], ["nonsense"]):
        p = here(*argv)
        assert p.returncode == 2 and "Traceback" not in p.stderr
