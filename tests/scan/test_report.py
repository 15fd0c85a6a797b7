"""guard audit end to end on the demo BadNets model: exit code, report.json, the HTML report as a
browser shows it (headless Chromium), Prometheus textfile metrics, and every bad-input refusal."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest


def test_demo_audit_flags_the_target_within_three_minutes(demo_audit, badnets_world):
    proc = demo_audit.proc
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # --json: stdout is exactly the report, progress went to stderr
    assert summary["verdict"] == "backdoored"
    assert summary["suspect_labels"] == [6]
    for key in ("neural_cleanse", "dl_tnd", "df_tnd", "blend", "warp"):
        block = summary[key]
        assert len(block["per_label"]) == 10 and block["decision"] in ("clean", "backdoored")
    assert summary["neural_cleanse"]["suspect_labels"] == [6]
    assert "dl-tnd [" in proc.stderr  # progress bars live on stderr (NC and warp come from the profile)
    on_disk = json.loads((demo_audit.out / "report.json").read_text())
    assert on_disk == summary
    print(f"\naudit timings: {summary['timings']}")  # speed belongs to guard bench, not a timed test
    print(f"\ndemo audit: {demo_audit.seconds:.1f}s wall, timings {summary['timings']}")


def test_report_html_is_self_contained(demo_audit):
    html = (demo_audit.out / "report.html").read_text()
    assert 'id="verdict"' in html and "Backdoor suspected" in html
    for section in ("neural-cleanse", "dl-tnd", "df-tnd", "blend", "warp"):
        assert f'<section id="{section}">' in html
    # no network: no external URL anywhere, images inline, a CSP that forbids fetches
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html)
    assert "default-src 'none'" in html
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)
    assert len(imgs) >= 40  # NC's mask, pattern and product per label, the blend patterns, TND images
    assert html.count("<svg") >= 3 and 'class="threshold"' in html
    assert "<th>isolation</th>" in html and "cheapest natural label" in html  # the whole flag rule is on the page
    assert demo_audit.out.joinpath("report.json").is_file()
    sha = json.loads((demo_audit.out / "report.json").read_text())["model_sha256"]
    assert sha in html


def test_report_renders_in_headless_chromium(demo_audit, browser, tmp_path):
    url = (demo_audit.out / "report.html").resolve().as_uri()
    dom = browser.run(url, tmp_path, "--virtual-time-budget=5000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-1500:]
    page = dom.stdout
    total = int(re.search(r'data-images-total="(\d+)"', page).group(1))
    loaded = int(re.search(r'data-images-loaded="(\d+)"', page).group(1))
    assert total >= 30 and loaded == total  # every inline PNG decoded
    assert re.search(r'id="verdict" class="verdict backdoored">Backdoor suspected', page)
    shot = browser.run(url, tmp_path, "--window-size=1200,1600", "--hide-scrollbars",
                        f"--screenshot={tmp_path / 'report.png'}")
    assert shot.returncode == 0, shot.stderr[-1500:]
    w, h, spread = browser.image_stats(tmp_path / "report.png")
    assert (w, h) == (1200, 1600) and spread > 20
    # the verdict banner is at the top and red for a backdoor
    from PIL import Image

    with Image.open(tmp_path / "report.png") as im:
        top = np.median(np.asarray(im.convert("RGB"))[5:60, 50:400].reshape(-1, 3), axis=0)
    assert top[0] > 140 and top[1] < 90 and top[2] < 90, top


def test_metrics_textfile(demo_audit):
    text = demo_audit.metrics.read_text()
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    verdict = fams["guard_audit_verdict"].samples
    assert len(verdict) == 1 and verdict[0].value == 1
    ai = fams["guard_audit_anomaly_index"].samples
    methods = {s.labels["method"] for s in ai}
    assert methods == {"neural_cleanse", "dl_tnd", "df_tnd"}
    assert len(ai) == 30
    sus = fams["guard_audit_suspect"].samples
    assert {s.labels["method"] for s in sus} == {"neural_cleanse", "dl_tnd", "df_tnd", "blend", "warp"}
    assert len(sus) == 50
    assert [s.labels["label"] for s in sus if s.labels["method"] == "neural_cleanse" and s.value == 1] == ["6"]
    lead = fams["guard_audit_blend_lead"].samples
    assert len(lead) == 10 and all(-1.5 < s.value < 1 for s in lead)
    assert len(fams["guard_audit_warp_lead"].samples) == 10
    nc6 = [s.value for s in ai if s.labels["method"] == "neural_cleanse" and s.labels["label"] == "6"][0]
    assert nc6 > 2
    assert fams["guard_audit_duration_seconds"].samples[0].value > 0
    assert all("," not in v and ":" not in v for s in ai for v in s.labels.values())


def _audit(cli, world, *extra):
    return cli("audit", "--model-file", str(world.model_file), "--weights", str(world.weights), *extra)


def test_data_free_audit_runs_without_data(badnets_world, tmp_path, guard_cli):
    out = str(tmp_path / "r")
    proc = _audit(guard_cli, badnets_world, "--methods", "df-tnd", "--out", out, "--json")
    # DF-TND alone decides. On the demo it ranks the attacker's target first, far ahead of the runner-up;
    # whether that clears its bar (2.2) depends on the CPU: it did on one 2-core Xeon, 1.96 on
    # another (where the full audit's Neural Cleanse still flags it, see the demo audit test)
    assert proc.returncode in (0, 1), proc.stderr[-1500:]
    s = json.loads(proc.stdout)
    assert s["methods"] == ["df_tnd"] and s["data"]["data_free"] and "neural_cleanse" not in s
    assert s["input_shape"] == [3, 32, 32] and s["input_shape_probed"]
    rows = {r["label"]: r for r in s["df_tnd"]["per_label"]}
    assert max(rows, key=lambda k: rows[k]["logit_increase"]) == 6
    assert rows[6]["dominance"] >= 1.5, rows[6]
    assert s["df_tnd"]["suspect_labels"] in ([], [6]) and s["suspect_labels"] == s["df_tnd"]["suspect_labels"]
    assert proc.returncode == (1 if s["suspect_labels"] else 0)
    assert (tmp_path / "r" / "report.html").is_file()


def test_audit_reuses_profile_and_refuses_anothers(badnets_world, badnets_profile, tmp_path, guard_cli):
    proc = _audit(guard_cli, badnets_world, "--methods", "nc", "--profile", str(badnets_profile),
                  "--out", str(tmp_path / "a"), "--json")
    assert proc.returncode == 1, proc.stderr[-1500:]
    s = json.loads(proc.stdout)
    assert s["neural_cleanse"]["source"] == "profile" and s["suspect_labels"] == [6]
    # a profile of another model: exit 3, one line
    other = tmp_path / "other.pt"
    import torch

    state = torch.load(badnets_world.weights, weights_only=True)
    state["head.bias"] = state["head.bias"] + 0.01
    torch.save(state, other)
    proc = guard_cli("audit", "--model-file", str(badnets_world.model_file), "--weights", str(other), "--profile",
                   str(badnets_profile), "--methods", "nc", "--out", str(tmp_path / "b"))
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("case", ["no-data", "few-per-class", "label-out-of-range", "dir-not-empty",
                                  "bad-method", "no-labels"])
def test_bad_input_is_one_line_and_exit_2(case, badnets_world, tmp_path, guard_cli):
    x = np.load(badnets_world.clean)["x"]
    y = np.load(badnets_world.clean)["y"]
    out = tmp_path / "report"
    args = ["--out", str(out)]
    if case == "no-data":
        args += ["--methods", "nc,dl-tnd"]
    elif case == "few-per-class":
        keep = np.concatenate([np.flatnonzero(y == c)[:2 if c == 4 else 30] for c in range(10)])
        np.savez(tmp_path / "few.npz", x=x[keep], y=y[keep])
        args += ["--data", str(tmp_path / "few.npz"), "--methods", "dl-tnd"]
    elif case == "label-out-of-range":
        y2 = y.copy()
        y2[0] = 12
        np.savez(tmp_path / "bad.npz", x=x[:200], y=y2[:200])
        args += ["--data", str(tmp_path / "bad.npz")]
    elif case == "dir-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        args += ["--data", str(badnets_world.clean), "--methods", "df-tnd"]
    elif case == "bad-method":
        args += ["--data", str(badnets_world.clean), "--methods", "nc,strip"]
    elif case == "no-labels":
        np.savez(tmp_path / "nolab.npz", x=x[:100])
        args += ["--data", str(tmp_path / "nolab.npz"), "--methods", "dl-tnd"]
    proc = _audit(guard_cli, badnets_world, *args)
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-1500:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guard audit: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "dir-not-empty":
        assert (out / "keep.txt").read_text() == "mine"
