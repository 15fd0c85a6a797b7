"""The TorchServe throughput measurement on a tiny model: both archives load in one real TorchServe
(loopback, token auth on), both handlers answer, the baseline decodes requests exactly like the guarded
handler (400 on a malformed body) and answers the model's own label, and the server is stopped afterwards."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from guard.demo.glyphs import glyphs
    from guard.demo.nets import net_file
    from guard.demo.nets.demo_net import DemoNet
    from guard.scan import NeuralCleanse, build_profile

    torch.manual_seed(0)
    model = DemoNet().eval()
    x, y = glyphs(80, seed=5)
    profile, _ = build_profile(model, x, y, nc=NeuralCleanse(max_rounds=1, progress=False), progress=False)
    d = tmp_path_factory.mktemp("tsworld")
    shutil.copyfile(net_file("demo_net"), d / "model.py")
    torch.save(model.state_dict(), d / "weights.pt")
    return d, profile.save(d / "profile"), x, model


def test_guarded_and_baseline_handlers_both_serve_and_are_compared(tiny_world, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    from guard.bench import serving
    from guard.torchserve.client import http

    d, profile_dir, x, model = tiny_world
    seen = {}
    original = serving._load

    def spy(url, key, bodies, **kw):  # also probe one malformed request per model while it is up
        name = url.rsplit("/", 1)[1]
        if name not in seen:
            seen[name] = (http(url, key=key, body=b'{"instances": [[1, 2]]}', content_type="application/json"),
                          http(url, key=key, body=bodies[0], content_type="application/json"))
        return original(url, key, bodies, **kw)

    serving._load = spy
    try:
        r = serving.torchserve_throughput(d / "model.py", d / "weights.pt", profile_dir, x, requests=3, rounds=2,
                                          concurrency=2, work_dir=tmp_path / "ts", start_timeout=300,
                                          grid_clients=(2, 3), grid_batch_sizes=(1, 4))
    finally:
        serving._load = original
    assert r["torchserve_throughput_ratio"] > 0 and len(r["pair_ratios"]) == 2
    # the grid: every route, archive batch size and client count, each with its own ratio
    routes = {"direct", "via_ingress"} if shutil.which("nginx") else {"direct"}
    cells = {(c["route"], c["batch_size"], c["clients"]) for c in r["grid"]}
    assert cells == {(route, b, n) for route in routes for b in (1, 4) for n in (2, 3)}
    assert all(c["ratio"] > 0 and len(c["pair_ratios"]) == 2 for c in r["grid"])
    assert {"guarded_b4", "baseline_b4"} <= set(seen)  # the batch-4 archives answered too
    if shutil.which("nginx"):  # the ingress's cost, through nginx / TorchServe's port, at 4 and 16 clients
        assert r["config"]["ingress"] == "nginx" and set(r["ingress_throughput_ratio"]) == {"4", "16"}
        assert all(v > 0 for v in r["ingress_throughput_ratio"].values())
        for c, runs in r["ingress_rounds"].items():
            assert all(run["answered"] == run["requests"] == 3 * int(c) for m in runs for run in runs[m]), runs
    for name in ("guarded", "baseline"):
        for run in r["rounds"][name]:
            assert run["answered"] == run["requests"] == 6, run
        (bad, bad_body), (ok, ok_body) = seen[name]
        assert bad == 400 and set(json.loads(bad_body)) == {"error"}, (name, bad, bad_body)
        assert ok in (200, 403), (name, ok, ok_body)
        (pred,) = json.loads(ok_body)["predictions"]
        want = {"label", "probabilities", "verdict", "reasons", "scores"} if name == "guarded" else {"label",
                                                                                                      "probabilities"}
        assert set(pred) == want, (name, pred)
        if name == "baseline":
            with torch.inference_mode():
                label = int(model(torch.from_numpy(x[:1])).argmax(1))
            assert pred["label"] == label
            np.testing.assert_allclose(sum(pred["probabilities"]), 1.0, atol=1e-4)
    # stopped: no state file left, nothing listening
    assert not (tmp_path / "ts" / "run" / "serve.json").exists()
