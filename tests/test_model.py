"""Model loading contract: one class, weights_only, clear errors, fingerprint, hooks that clean up."""

import numpy as np
import pytest
import torch

from guard import FeatureTap, ModelError, fingerprint, load_model
from guard.demo.nets import net_file
from guard.model import Normalized, feature_layer, inner_layer, parse_normalize


@pytest.fixture
def demo_files(tmp_path):
    from guard.demo.nets.demo_net import DemoNet

    torch.manual_seed(0)
    torch.save(DemoNet().state_dict(), tmp_path / "w.pt")
    return net_file("demo_net"), tmp_path / "w.pt"


def test_loads_in_eval_mode(demo_files):
    model = load_model(*demo_files)
    assert not model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_file_without_module_class(tmp_path, demo_files):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    with pytest.raises(ModelError, match="no torch.nn.Module"):
        load_model(f, demo_files[1])


def test_the_network_is_picked_and_real_ambiguity_needs_model_class(tmp_path, demo_files):
    f = tmp_path / "m.py"
    f.write_text(net_file("demo_net").read_text() + "\n\nclass Other(nn.Module):\n    pass\n")
    notes: list[str] = []
    assert type(load_model(f, demo_files[1], notes=notes)).__name__ == "DemoNet"
    assert "DemoNet" in notes[0] and "weights fit" in notes[0]
    f.write_text(net_file("demo_net").read_text() + "\n\nclass Twin(DemoNet):\n    pass\n")
    with pytest.raises(ModelError, match="--model-class"):
        load_model(f, demo_files[1])
    assert type(load_model(f, demo_files[1], model_class_name="DemoNet")).__name__ == "DemoNet"


def test_weights_that_do_not_fit(demo_files):
    with pytest.raises(ModelError, match="do not fit"):
        load_model(net_file("gap_net"), demo_files[1])


def test_pickled_objects_are_refused(tmp_path, demo_files):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(ModelError):
        load_model(demo_files[0], bad)


def test_fingerprint_follows_the_weights(demo_files):
    a = load_model(*demo_files)
    b = load_model(*demo_files)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_feature_tap_removes_its_hook_even_on_error(demo_files):
    model = load_model(*demo_files)
    name, layer = feature_layer(model)
    assert name == "head"
    with pytest.raises(RuntimeError), FeatureTap(model) as tap:
        model(torch.zeros(1, 3, 32, 32))
        assert tap.features.shape == (1, 128)
        raise RuntimeError("boom")
    assert not layer._forward_pre_hooks


def test_inner_layer_is_the_last_spatial_block_and_its_tap_cleans_up(demo_files):
    from guard.demo.nets.gap_net import GapNet

    model = load_model(*demo_files)
    assert inner_layer(model, torch.zeros(1, 3, 32, 32)) == "features.8"  # the last max-pool, 64x4x4
    gap = GapNet().eval()
    assert inner_layer(gap, torch.zeros(1, 1, 16, 16)) == "body.9"  # the ReLU before global pooling
    assert not any(m._forward_hooks for m in gap.modules())  # the probe's hooks are gone
    assert inner_layer(model, torch.zeros(1, 3, 32, 32), "features.5") == "features.5"
    with pytest.raises(ModelError, match="inner-layer"):
        inner_layer(model, torch.zeros(1, 3, 32, 32), "nope")
    inner = dict(model.named_modules())["features.8"]
    with pytest.raises(RuntimeError), FeatureTap(model, inner=inner) as tap:
        model(torch.zeros(2, 3, 32, 32))
        assert tuple(tap.inner.shape) == (2, 64, 4, 4)
        raise RuntimeError("boom")
    assert not inner._forward_hooks and not feature_layer(model)[1]._forward_pre_hooks


def test_inner_pooling_is_the_same_for_one_input_and_a_batch():
    from guard.online.kernels import pool

    a = torch.rand(5, 6, 3, 4)
    want = np.concatenate([a.numpy().mean((2, 3)), a.numpy().max((2, 3))], 1)
    np.testing.assert_allclose(pool(a.numpy()), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pool(a[2:3].numpy()), want[2:3], rtol=1e-6, atol=1e-6)


def test_normalize_wraps_inside(demo_files):
    model = load_model(*demo_files, normalize="0.5,0.25")
    assert isinstance(model, Normalized)
    inner = load_model(*demo_files)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), inner((x - 0.5) / 0.25))
    assert parse_normalize("0.4/0.5/0.6,0.2/0.2/0.2") == ([0.4, 0.5, 0.6], [0.2, 0.2, 0.2])
    with pytest.raises(ModelError):
        parse_normalize("abc")


def test_num_classes_from_a_batch_a_tensor_or_a_shape_and_the_model_left_as_it_was():
    from guard.model import num_classes

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 7)).train()
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    assert num_classes(net, x) == num_classes(net, torch.from_numpy(x)) == num_classes(net, (3, 8, 8)) == 7
    assert net.training and all(p.requires_grad for p in net.parameters())


def test_check_labels_names_the_range_and_the_classes():
    from guard.errors import InputError
    from guard.model import validate_labels

    validate_labels(np.array([0, 4]), 5)
    validate_labels(None, 5)
    with pytest.raises(InputError, match=r"from 0 to 5 but the model has 5 classes \(0\.\.4\)"):
        validate_labels(np.array([0, 5]), 5)
    with pytest.raises(InputError, match="from -1 to 2"):
        validate_labels(np.array([-1, 2]), 5)
