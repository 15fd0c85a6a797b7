"""Quality floors of the fixtures every other test builds on: if these fail, nothing else means much."""

from guard import load_model
from guard.data import load_npz
from guard.demo.train import attack_success
from guard.model import accuracy


def test_demo_backdoor_is_real(demo_world):
    assert demo_world.clean_accuracy >= 0.90
    assert demo_world.attack_success >= 0.95


def test_demo_files_reload_to_the_same_model(demo_world):
    model = load_model(demo_world.model_file, demo_world.weights)
    x, y = load_npz(demo_world.holdout)
    assert abs(accuracy(model, x, y) - demo_world.clean_accuracy) < 1e-9


def test_clean_world_has_no_backdoor(clean_world):
    assert clean_world.clean_accuracy >= 0.90
    assert clean_world.attack_success <= 0.10


def test_gap_world_backdoor_is_real(gap_world):
    assert accuracy(gap_world.model, gap_world.x_test, gap_world.y_test) >= 0.90
    assert attack_success(gap_world.model, gap_world.attack, gap_world.x_test, gap_world.y_test) >= 0.95
