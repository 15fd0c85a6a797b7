"""The stream figures: triggered queries spread evenly among clean ones, the trigger memory emptied before and
after, and a repeated blended key caught on the stream by a guard with the memory and not without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.bench.stream import clean_traffic, interleave, stream_figures
from guard.demo.glyphs import glyphs
from guard.online.memory import TriggerMemory


@pytest.mark.parametrize("n_clean, n_triggered", [(400, 100), (10, 3), (5, 0), (0, 4)])
def test_interleave_spreads_the_triggered_queries(n_clean, n_triggered):
    order = interleave(n_clean, n_triggered)
    assert len(order) == n_clean + n_triggered and order.sum() == n_triggered
    if n_triggered and n_clean:
        assert not order[0], "clean traffic comes first"
        gaps = np.diff(np.flatnonzero(order))
        assert gaps.max() - gaps.min() <= 1


def test_clean_traffic_leaves_out_the_images_the_triggered_queries_are_stamped_on():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    assert clean_traffic(x, np.array([0, 3, 4]), 5).ravel().tolist() == [5, 6, 7, 8, 9]
    assert clean_traffic(x, np.array([0, 3, 4]), 2).ravel().tolist() == [5, 6]
    assert clean_traffic(x, np.array([], dtype=np.int64), 20).ravel().tolist() == list(range(10))


def test_a_repeated_key_is_caught_on_the_stream_with_the_memory_only():
    from guard.online import Guard
    from guard.scan import build_profile
    from guard.scan.neural_cleanse import NeuralCleanse

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 30 * 30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x, _ = glyphs(1000, seed=1)
    with torch.no_grad():
        y = net(torch.from_numpy(x)).argmax(1).numpy()
    profile, _ = build_profile(net, x[:300], y[:300], consistency=False, progress=False, memory="off",
                               nc=NeuralCleanse(max_rounds=2, progress=False))
    key = np.random.default_rng(0).random(x.shape[1:], dtype=np.float32)
    triggered = (0.75 * x[300:400] + 0.25 * key).astype(np.float32)
    with torch.no_grad():
        served = net(torch.from_numpy(triggered)).argmax(1).numpy()  # "the target": whatever it answers
    memory = TriggerMemory().fit(x[:300]).infer_threshold(x[:300], fpr=0.01)
    with_memory = Guard(net, profile, mode="enforce", memory=memory)
    on = stream_figures(with_memory, triggered, served, x[400:800], x[:300])
    off = stream_figures(Guard(net, profile, mode="enforce"), triggered, served, x[400:800], x[:300])
    assert on["n_triggered"] == off["n_triggered"] == 100 and on["n_clean"] == 400
    assert on["triggered_rejected_by_memory"] >= 0.75 and off["triggered_rejected_by_memory"] == 0
    assert on["residual_attack_success"] <= off["residual_attack_success"] - 0.5
    assert on["clean_rejected_by_memory"] <= 0.04
    assert memory._filled == 0, "the memory is emptied after the stream"
