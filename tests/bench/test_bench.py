"""``guard bench`` on its tiny configuration (one attack, a few steps): it runs end to end through the
CLI and writes results.json with every field it promises and a results.md rendered from it.

Quality is not asserted here (the tiny models are barely trained); the benchmark's figures are the
point of ``guard bench --quick``, which is not part of the test suite. The pieces with a contract of
their own (STRIP's statistic, the combined score, the kNN check) get small exact tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BIN = Path(sys.executable).parent


def bench(out: Path, *extra: str) -> dict:
    done = subprocess.run([str(BIN / "guard"), "bench", "--tiny", "--threads", "1", "--out", str(out), "--json",
                           *extra], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "GUARD_BENCH_QUIET": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    on_disk = json.loads((out / "results.json").read_text())
    assert printed == on_disk
    return on_disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    return bench(out, "--jobs", "1"), out


def _online_fields(v: dict) -> None:
    assert set(v) >= {"auroc", "tpr_at_1pct_fpr"}
    for key in ("auroc", "tpr_at_1pct_fpr"):
        assert v[key] is None or 0.0 <= v[key] <= 1.0


def test_every_attack_row_has_every_field(tiny):
    r, _ = tiny
    assert r["schema_version"] == 1 and r["config"]["preset"] == "tiny"
    assert [a["name"] for a in r["attacks"]] == ["badnets"]
    assert r["config"]["nets"] == ["demo_net"] and all(a["net"] == "demo_net" for a in r["attacks"])
    for a in r["attacks"]:
        assert {"name", "net", "clean_accuracy", "attack_success_rate", "detected", "online", "repair", "strip",
                "art_strip", "scan_seconds", "targets", "purification"} <= set(a)
        pur = a["purification"]["per_class"]["10"]  # the tiny preset: fine-pruning with 10 images per class
        assert [r["method"] for r in pur["rows"]] == ["original", "fine-pruning"]
        assert pur["best"] in (None, "fine-pruning")
        for row in pur["rows"]:
            assert 0 <= row["real_asr_before"] <= 1 and 0 <= row["accuracy_after"] <= 1
            assert row["per_class"] == 10 and len(row.get("comeback_asr") or [0, 0, 0, 0]) == 4
            if "comeback_asr" in row:  # beside it, what guard purify sees of it (None: no reversed trigger)
                assert "relapse" in row and (row["relapse"] is None) == (not row["suspect_labels"])
                assert row["relapse"] is None or 0 <= row["relapse"] <= 1
        assert 0 <= a["clean_accuracy"] <= 1 and 0 <= a["attack_success_rate"] <= 1
        assert set(a["detected"]) == {"neural_cleanse", "dl_tnd", "df_tnd", "blend"}
        for method in a["detected"].values():
            assert isinstance(method["detected"], bool) and isinstance(method["flagged_labels"], list)
        online = a["online"]
        assert {"feature", "knn", "consistency", "neuron", "overlap", "combined"} <= set(online)
        assert online["combined"]["rule"] == "fisher"  # the guard's own decision statistic
        for name in a["online"]["combined"]["checks"]:
            _online_fields(online[name])
        _online_fields(online["combined"])
        assert set(online["combined"]["verdict"]) == {"tpr", "fpr"}
        _online_fields(online["combined_successful"])
        _online_fields(online["opt_in"]["flip"])
        _online_fields(online["opt_in"]["combined_with_flip"])
        assert {"attack_success_rate", "clean_accuracy", "clean_accuracy_loss_points"} <= set(a["repair"])
        _online_fields(a["strip"])
        assert a["strip"]["n"] == r["config"]["strip_n"]
        peers = a["peers"]
        assert set(peers) == {"strip", "ibd_psc", "scale_up", "ted", "ted_pp"}
        assert peers["strip"]["auroc"] == a["strip"]["auroc"] and peers["strip"]["forwards_per_input"] == 10
        assert peers["ibd_psc"] == {"available": False, "forwards_per_input": 6,  # DemoNet has no BatchNorm
                                    "reason": "IBD-PSC needs BatchNorm layers to amplify; this model has none"}
        _online_fields(peers["scale_up"])
        _online_fields(peers["scale_up"]["data_limited"])
        assert peers["scale_up"]["forwards_per_input"] == 6
        for key in ("ted", "ted_pp"):  # one forward per input; DemoNet's convolutions, ReLUs and Linears
            assert peers[key]["available"] and peers[key]["forwards_per_input"] == 1 and peers[key]["layers"] == 8
            _online_fields(peers[key])
        wb = a["whitebox"]
        assert [_budget(b) for b in wb["budgets"]] == [_padded(b) for b in r["config"]["whitebox_budgets"]]
        evading = [b for b in wb["budgets"] if b["evade"]]  # the attacker who also evades the memory
        assert evading and all(b["residual_similarity_last"] < b["residual_similarity_first"] for b in evading)
        assert sorted(wb["in_surrogate"] + list(wb["not_in_surrogate"])) == sorted(a["online"]["combined"]["checks"])
        for b in [wb["baseline"], *wb["budgets"]]:
            for key in ("attack_success_bare", "residual_attack_success", "rejection_rate"):
                assert 0.0 <= b[key] <= 1.0
            assert b["residual_attack_success"] <= b["attack_success_bare"] + 1e-9
        assert wb["max_residual_attack_success"] == max(b["residual_attack_success"] for b in wb["budgets"])
        if a["stream"]["memory_watches"] is not None:  # the same figures with the profile's memory on a stream
            for b in [wb["baseline"], *wb["budgets"], *wb["fresh_noise"]]:
                assert 0 <= b["residual_attack_success_with_memory"] <= 1
        gb = a["graybox"]
        assert gb["trigger"] == "patch" and gb["layers_matched"] >= 8
        assert gb["memory_watches"] == a["stream"]["memory_watches"]
        for b in gb["budgets"]:  # the profile's memory, where its scan suspected a label
            if gb["memory_watches"] is None:
                assert "residual_attack_success_with_memory" not in b
            else:
                assert b["residual_attack_success_with_memory"] <= b["residual_attack_success"] + 1e-9
                assert 0 <= b["clean_rejected_with_memory"] <= 1
        if gb["memory_watches"] is not None:
            assert [f["amplitude"] for f in gb["fresh_noise"]] == [0.05, 0.1, 0.2]
        st = a["stream"]
        assert st["default"]["n_triggered"] == st["without_memory"]["n_triggered"] >= 1
        assert st["without_memory"]["clean_rejected_by_memory"] == 0
        if st["memory_watches"] is None:
            assert st["default"] == st["without_memory"]
        assert [_budget(b) for b in gb["budgets"]] == [_padded(b) for b in r["config"]["graybox_budgets"]]
        assert [b["residual_similarity_first"] is not None for b in gb["budgets"]] == [
            bool(b["evade"]) for b in gb["budgets"]]
        assert [b["rank_loss_first"] is not None for b in gb["budgets"]] == [bool(b["rank"]) for b in gb["budgets"]]
        for b in [gb["baseline"], *gb["budgets"]]:
            assert b["residual_attack_success"] <= b["attack_success_bare"] + 1e-9
        assert "stamped" not in gb  # the kept triggered inputs are not part of the JSON
        ap = gb["after_purification"]  # the same keys against the purified model (tiny: fine-pruning, 10 per class)
        assert (ap["per_class"], ap["method"]) == (10, "fine-pruning")
        if ap["ok"]:
            assert [_budget(b) for b in ap["budgets"]] == [_budget(b) for b in gb["budgets"]]
            for b in ap["budgets"]:
                assert 0 <= b["residual_attack_success"] <= b["attack_success_bare"] + 1e-9
            assert ap["max_residual_attack_success"] == max(b["residual_attack_success"] for b in ap["budgets"])
            if a["suspect_labels"] and ap["memory_watches"] != "all":  # the rescan keeps watching the row's suspects
                assert set(a["suspect_labels"]) <= set(ap["memory_watches"])
            worst = ap.get("max_residual_attack_success_with_memory", ap["max_residual_attack_success"])
            assert a["targets"]["graybox_residual_attack_success_after_purification<=0.25"] == (worst <= 0.25)
        assert {"combined_tpr_at_1pct_fpr>=best_peer", "whitebox_residual_attack_success<=0.25",
                "graybox_residual_attack_success<=0.25"} <= set(a["targets"])
        if gb["memory_watches"] is not None:  # the default guard's figure is judged too
            assert a["targets"]["graybox_residual_attack_success_with_memory<=0.25"] == (
                gb["max_residual_attack_success_with_memory"] <= 0.25)
        if r["art_strip_available"]:
            _online_fields(a["art_strip"])
        else:
            assert a["art_strip"] is None and r["art_strip_reason"]


def _budget(b: dict) -> tuple[float, ...]:
    return b["steps"], b["weight"], b["evade"], b.get("rank", 0.0)


def _padded(b: list) -> tuple[float, ...]:
    return (*b, *(0.0,) * (4 - len(b)))


def test_clean_models_report_false_positives(tiny):
    r, _ = tiny
    (c,) = r["clean_models"]
    assert c["net"] == "demo_net"
    assert set(c["detected"]) == {"neural_cleanse", "dl_tnd", "df_tnd", "blend"}
    assert all(isinstance(v["false_positive"], bool) for v in c["detected"].values())
    floor = c["graybox_floor"]  # the gray-box attacker's strongest budget against the clean model
    plain = [b for b in r["config"]["graybox_budgets"] if len(b) == 2]  # the strongest that ignores the memory
    assert floor["budget"] == dict(zip(("steps", "weight"), max(plain)))
    assert set(floor["attacks"]) == {"badnets"}
    assert 0.0 <= floor["attacks"]["badnets"]["residual_attack_success"] <= 1.0


def test_performance_fields(tiny):
    p = tiny[0]["performance"]
    for key in ("guard_overhead_p50_ratio", "guard_overhead_p95_ratio"):
        assert set(p[key]) == {"batch_1", "batch_32"} and all(v > 0 for v in p[key].values())
    assert p["nc_batched_speedup"] > 0
    nc = p["nc_batched"]
    assert nc["labels"] == 10 and len(nc["batched"]["l1_norms"]) == len(nc["per_label_loop"]["l1_norms"]) == 10
    assert p["scan_seconds"] > 0 and p["scan"]["per_attack"]["badnets"] > 0
    sb = p["serving_breakdown_us"]
    stages = ("decode", "answers", "metrics", "encode", "run.validate", "run.forward", "run.scoring", "run.policy",
              "audit_per_refused_instance", "stages_sum", "whole")
    assert all(sb["guarded"][k] > 0 for k in stages), sb
    assert set(sb["baseline"]) == {"decode", "forward_and_answer", "encode", "stages_sum", "whole"}
    assert sb["guarded"]["run.forward"] > sb["guarded"]["run.scoring"]  # the model dominates a request
    bd = p["overhead_breakdown_batch_1_us"]
    assert {"bare_forward", "tapped_forward", "validate", "run", "check.feature", "check.knn"} <= set(bd)
    assert p["flip_check_cost_batch_1"]["ratio"] > 1
    assert "torchserve_throughput_ratio" in p  # measured by --quick; the tiny run skips TorchServe
    assert p["torchserve_throughput_ratio"] is None and p["torchserve"]["skipped"]


def test_targets_are_listed_with_their_verdicts(tiny):
    t = tiny[0]["targets"]
    scopes = {row["scope"] for row in t}
    assert {"badnets", "performance"} <= scopes
    assert all(row["met"] in (True, False, None) and row["target"] and row["measured"] for row in t)
    assert any("torchserve_throughput_ratio" in row["target"] and row["met"] is None for row in t)


def test_markdown_is_rendered_from_the_json(tiny):
    r, out = tiny
    md = (out / "results.md").read_text()
    assert "| attack | clean acc | ASR |" in md and "## Targets" in md and "## Performance" in md
    assert "| attack | guard (1) | STRIP (10) | IBD-PSC (6) | SCALE-UP (6) |" in md and "White-box attacker" in md
    assert "| TED (1) | TED++ (1) |" in md
    assert r["command"] in md
    assert set(r["code"]) == {"commit", "dirty", "changed", "reason"} and "\n- code: " in md  # which code it measured
    assert (out / "models").is_dir() and any((out / "models").glob("*.safetensors"))


def test_report_labels_rows_by_network(tiny):
    """A run over two networks: every table row and target names its network; one network: names only."""
    import copy

    from guard.bench.report import render, targets

    r = copy.deepcopy(tiny[0])
    r["config"]["nets"] = ["demo_net", "resnet18"]
    r["attacks"] = [dict(copy.deepcopy(r["attacks"][0]), net="resnet18"), r["attacks"][0]]
    r["clean_models"] = r["clean_models"] + [dict(copy.deepcopy(r["clean_models"][0]), net="resnet18")]
    md = render(r)
    assert "| badnets (demo_net) |" in md and "| badnets (resnet18) |" in md
    assert md.index("| badnets (demo_net) |") < md.index("| badnets (resnet18) |"), "grouped in the run's order"
    assert "- clean (resnet18) (clean acc" in md and "zoo: demo_net, resnet18 on glyphs" in md
    assert {"badnets (demo_net)", "badnets (resnet18)"} <= {scope for scope, *_ in targets(r)}
    assert "| badnets |" in render(tiny[0])


# ------------------------------------------------------------------ small exact contracts


class _Constant(nn.Module):
    """Logits that ignore the input: a fixed class (a perfect 'trojan') or a uniform output."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("z", torch.tensor(logits))

    def forward(self, x):
        return self.z.expand(len(x), -1)


def test_strip_entropy_is_zero_for_a_fixed_answer_and_log_k_for_a_uniform_one():
    from guard.bench.strip import Strip

    x = np.random.default_rng(0).random((12, 3, 8, 8), dtype=np.float32)
    fixed = Strip(n=10).fit(_Constant([50.0, 0, 0, 0]), x, x)
    np.testing.assert_allclose(fixed.score(x[:3]), 0.0, atol=1e-9)  # -entropy: 0 is the most suspect
    uniform = Strip(n=10).fit(_Constant([0.0, 0, 0, 0]), x, x)
    np.testing.assert_allclose(uniform.score(x[:3]), -2.0, atol=1e-9)  # log2(4) bits
    again = Strip(n=10).fit(_Constant([1.0, 0, 0, 0]), x, x)
    np.testing.assert_array_equal(again.score(x), again.score(x))  # seeded draws


def test_knn_check_contract():
    from guard.online.checks import CHECKS, KNNCheck, Record

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    feats = (centres[rng.integers(0, 4, 400)] + rng.normal(size=(400, 16))).astype(np.float32)
    out = (rng.normal(size=(50, 16)) * 3).astype(np.float32)

    def rec(f):
        return Record(np.zeros((len(f), 1, 1, 1), np.float32), np.zeros((len(f), 4), np.float32), f)

    c = KNNCheck(k=5, max_bank=300).fit(rec(feats[:300]))
    assert c.bank_rows_.shape == (300, 16) and c.starts_[0] == 0 and c.stops_[0] == 300  # one predicted class here
    c.infer_threshold(rec(feats[300:]), fpr=0.05)
    from guard.stats import roc_auc

    assert roc_auc(c.score(rec(feats[300:])), c.score(rec(out))) >= 0.95
    together = c.score(rec(out))
    alone = np.concatenate([c.score(rec(out[i:i + 1])) for i in range(len(out))])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    again = CHECKS["knn"].from_profile(*c.to_profile(), fpr=0.05)
    np.testing.assert_array_equal(again.score(rec(out)), together)


def test_worker_processes_give_the_same_rows(tiny, tmp_path):
    """--jobs 2 runs the attacks in two spawned processes: same seeded figures as in-process."""
    r1, _ = tiny
    r2 = bench(tmp_path / "b", "--jobs", "2", "--attacks", "badnets,blended", "--no-art")
    assert r2["machine"]["jobs"] == 2 and [a["name"] for a in r2["attacks"]] == ["badnets", "blended"]
    a1, a2 = r1["attacks"][0], r2["attacks"][0]
    for key in ("clean_accuracy", "attack_success_rate", "suspect_labels", "repair"):
        assert a1[key] == a2[key], key
    assert a1["online"]["combined"]["auroc"] == pytest.approx(a2["online"]["combined"]["auroc"], abs=1e-3)
    assert r2["art_strip_reason"] and all(a["art_strip"] is None for a in r2["attacks"])
    assert (tmp_path / "b" / "profiles" / "blended" / "profile.json").is_file()
    assert r2["attacks"][1]["whitebox"]["attack"] == "Blended" and len(r2["attacks"][1]["whitebox"]["budgets"]) == 3



def test_finished_rows_are_saved_and_a_rerun_resumes_them(tmp_path, monkeypatch):
    """A run that stops part-way keeps its finished rows: a rerun with the same configuration and code
    reuses them (marked ``resumed``); another configuration measures afresh."""
    from dataclasses import replace

    from guard.bench import runner
    from guard.bench.config import PRESETS

    calls = []

    def fake_row(cfg, name, *_args):
        calls.append((cfg.n_eval, name))
        return {"name": name, "net": cfg.zoo.net, "n": cfg.n_eval}, None

    monkeypatch.setattr(runner, "attack_row", fake_row)
    cfg = PRESETS["tiny"]
    args = (tmp_path / "models", tmp_path / "profiles", False, None)
    first = runner._saved_row(cfg, "badnets", *args)
    again = runner._saved_row(cfg, "badnets", *args)
    assert calls == [(cfg.n_eval, "badnets")] and "resumed" not in first[0]
    assert again == ({**first[0], "resumed": True}, None)
    (saved,) = (tmp_path / "rows").glob("*.json")
    assert saved.name.startswith("demo_net-badnets-")
    other = runner._saved_row(replace(cfg, n_eval=cfg.n_eval + 1), "badnets", *args)
    assert len(calls) == 2 and "resumed" not in other[0] and len(list((tmp_path / "rows").glob("*.json"))) == 2


def test_purification_targets_show_what_auto_measured():
    from guard.bench.report import _purify_measured

    def r(method, asr, drop, ok=True):
        return {"method": method, "ok": ok, "real_asr_after": asr, "accuracy_drop_points": drop}

    row = {"purification": {"per_class": {"50": {"rows": [r("original", 0.99, 0.0), r("auto", 0.009, 0.8),
                                                          r("auto:combined", 0.003, 0.2)],
                                                 "best": "auto:combined", "auto_best_or_tied": False}}}}
    assert (_purify_measured(row, "purify_auto_best_or_tied_50_per_class")
            == "auto 0.9%, 0.8 pt vs auto:combined 0.3%, 0.2 pt")
    assert _purify_measured(row, "purify_auto_attack_success<=0.1_50_per_class") == "0.9%"
    assert _purify_measured(row, "purify_auto_accuracy_drop<=2pt_50_per_class") == "0.8 pt"
    row["purification"]["per_class"]["50"]["rows"][1]["ok"] = False
    assert _purify_measured(row, "purify_auto_attack_success<=0.1_50_per_class") == "refused"


def test_a_method_that_cannot_run_on_the_evidence_gets_a_refused_row(monkeypatch):
    """Where neither the scan nor the blend and warp reversals found a trigger, trigger unlearning cannot run: its
    row says so (``ok`` false, the message in ``refused``) and the other methods' rows are still measured, instead
    of the whole attack row (and the run) failing."""
    from types import SimpleNamespace

    import numpy as np
    import torch
    from torch import nn

    from guard.bench.purification import purification_rows
    from guard.demo.attacks import BadNets
    from guard.purify import Evidence

    for reversal in ("from_blend_reversal", "from_warp_reversal"):
        monkeypatch.setattr(Evidence, reversal, classmethod(lambda cls, *a, **k: (cls(), {})))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    rng = np.random.default_rng(0)
    x = rng.random((60, 3, 32, 32), dtype=np.float32)
    y = np.arange(60) % 3  # every class, so the attack has victims
    rows = purification_rows(net, BadNets(target=1), x, y, x, y, profile=SimpleNamespace(suspect_labels=[], tensors={}),
                             methods=("unlearn", "fine-pruning"), per_class=20, with_comeback=False)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"unlearn", "fine-pruning"}
    assert by["unlearn"]["ok"] is False and "reversed trigger" in by["unlearn"]["refused"]
    assert by["unlearn"]["real_asr_after"] == by["unlearn"]["real_asr_before"]
    assert "refused" not in by["fine-pruning"]
