"""The benchmark zoo's network dimension: the cache key, training and loading per network, the model file.

Tiny sizes (a few hundred images, one epoch): these pin the plumbing, not quality; the floors of the
zoo's networks are asserted in tests/attacks/test_zoo.py.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from guard.bench.models import ZooConfig, zoo_model
from guard.demo.attacks.zoo import NETS, RESNET_WIDTH, model_file
from guard.demo.nets import net_file


def test_the_cache_key_follows_the_network_and_the_attack():
    demo, res = ZooConfig(), ZooConfig(net="resnet18")
    assert demo.net == "demo_net" and set(NETS) >= {"demo_net", "resnet18"}
    assert demo.key() != res.key() and demo.key("badnets") != res.key("badnets")
    assert res.key("badnets") != res.key("tact") and res.key() == ZooConfig(net="resnet18").key()
    with pytest.raises(KeyError, match="unknown network"):
        ZooConfig(net="nope").key()


@pytest.fixture
def one_thread():
    """One torch thread for this test only: the session's thread count decides how later fixtures train."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zoo_model_trains_caches_and_reloads_a_resnet(tmp_path, one_thread):
    cfg = ZooConfig(n_train=200, n_test=60, epochs=1, net="resnet18")
    first = zoo_model("badnets", cfg, cache=tmp_path)
    assert not first.cached and hasattr(first.model, "layer4") and first.model.fc.in_features == 8 * RESNET_WIDTH
    (path,) = tmp_path.glob("*.safetensors")
    assert path.name.startswith("resnet18-badnets-seed0-")
    again = zoo_model("badnets", cfg, cache=tmp_path)
    assert again.cached and again.clean_accuracy == first.clean_accuracy
    assert again.attack_success_rate == first.attack_success_rate
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    # the model file a user would archive builds the same network (no-argument class, same state_dict)
    ns: dict = {}
    exec(compile(model_file("resnet18"), "model.py", "exec"), ns)
    ns["ResNet18"]().load_state_dict(first.model.state_dict())
    assert model_file("demo_net") == net_file("demo_net").read_text()


def test_cli_nets_option():
    from guard.cli.bench import _nets

    assert _nets("resnet18, demo_net,resnet18") == ("resnet18", "demo_net")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown network"):
        _nets("vgg")
