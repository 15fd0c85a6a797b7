"""224x224 models through a user's whole path: ``guard scan``, ``guard archive``, ``guard serve`` and requests.

The models are torchvision's ResNet-18 layout (ImageNet stem, ``guard/demo/nets/tv_resnet.py``) and the bundled
vision transformer at patch 16 (196 tokens and a class token, two blocks, ``guard/demo/nets/vit.py``), each
trained for one epoch on 300 glyph images at 224x224 with a 16-pixel BadNets patch: enough to exercise every
size-dependent part (the scan's masks and hooks at 224, the transformer's token statistics over 197 tokens, the
profile's input shape, the archive's request bound, PNG and JSON decoding at 224, the served answer), not to
learn the task. Detection at this size needs a trained model,
which takes a minute of two cores: it is measured in the bench (``guard.bench.input_sizes``: the target named
and every triggered input stopped, figures in docs/benchmarks.md), not here.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image
from serve_helpers import guard_cli, guard_serve

from guard.data import load_npz
from guard.demo.attacks import BadNets
from guard.demo.world import build
from guard.torchserve.client import http

pytestmark = [pytest.mark.integration]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


NETS = {"tv_resnet": {}, "vit": {"IMAGE": 224, "PATCH": 16, "DEPTH": 2}}


@pytest.fixture(scope="module", params=sorted(NETS))
def world224(request, tmp_path_factory):
    return request.param, build(tmp_path_factory.mktemp(f"w224-{request.param}"), net=request.param, size=224,
                                n_train=300, n_clean=120, n_holdout=10, epochs=1, attack=BadNets(target=6, size=16),
                                **NETS[request.param])


def test_a_224_model_is_scanned_archived_and_served(world224, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs java")
    net, w = world224
    model_args = ("--model-file", str(w.model_file), "--weights", str(w.weights))
    profile = tmp_path / "profile"
    scan = guard_cli("scan", *model_args, "--data", str(w.clean), "--out", str(profile), "--max-rounds", "1",
                     "--no-warp", "--json")
    assert scan.returncode in (0, 1), scan.stderr  # clean or backdoored: a verdict, not an error
    assert json.loads(scan.stdout)["verdict"] in ("clean", "backdoored")
    written = json.loads((profile / "profile.json").read_text())
    assert written["input_shape"] == [3, 224, 224]
    if net == "vit":  # a transformer's blocks are read token by token at this size too
        assert "token" in written["checks"], sorted(written["checks"])

    store = tmp_path / "store"
    archived = guard_cli("archive", "--name", "big", *model_args, "--profile", str(profile), "--export-path",
                         str(store))
    assert archived.returncode == 0, archived.stderr
    with zipfile.ZipFile(store / "big.mar") as z:
        bound = yaml.safe_load(z.read("model-config.yaml"))["handler"]["max_request_bytes"]
    xh, _ = load_npz(w.holdout)
    body = json.dumps({"instances": np.round(xh[:1], 4).tolist()}).encode()  # float32 values as Python prints them
    compact = json.dumps({"instances": np.round(xh[:1].astype(np.float64), 4).tolist()}).encode()
    assert len(compact) > 1_048_576  # one 224x224 instance at 4 decimals is over 1 MiB already
    assert bound >= 3 * len(body) and bound >= 8 * len(compact)

    with guard_serve(store, tmp_path / "run") as (srv, _):
        url, key = f"{srv.urls['inference']}/predictions/big", srv.key("inference")
        for payload, ctype in ((png(xh[1]), "image/png"), (body, "application/json")):
            status, text = http(url, key=key, body=payload, content_type=ctype, timeout=120)
            assert status in (200, 403), text
            (answer,) = json.loads(text)["predictions"]
            assert answer["verdict"] in ("pass", "rejected") and set(answer["scores"]) >= {"feature", "ensemble"}
            if status == 200:
                assert len(answer["probabilities"]) == 10
        small = np.ascontiguousarray(xh[2][:, ::2, ::2])  # 112x112: refused with the size the model takes
        status, text = http(url, key=key, body=png(small), content_type="image/png", timeout=120)
        assert status == 400 and "224x224" in json.loads(text)["error"]
