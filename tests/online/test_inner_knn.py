"""The inner-layer nearest-neighbour check on a Blended model: the trigger the last layer's checks see
least (a seeded noise key blended over the whole image) is caught one block earlier, and the guard
deploying it stops the blended inputs at its calibrated clean rate."""

import numpy as np
import pytest

from guard import Guard
from guard.stats import roc_auc, tpr_at_fpr


@pytest.fixture(scope="module")
def blended():
    """The quick benchmark's Blended DemoNet (opacity 0.25, 4000 images, 5 epochs)."""
    from guard.demo.attacks.zoo import train_backdoored, zoo_data
    from guard.demo.glyphs import glyphs
    from guard.scan import NeuralCleanse, build_profile

    data = zoo_data(seed=0, n_train=4000, n_test=800)
    model, attack, acc, asr = train_backdoored("blended", seed=0, epochs=5, data=data)
    assert acc >= 0.95 and asr >= 0.9, (acc, asr)
    x, y = glyphs(800, seed=2)
    profile, _ = build_profile(model, x, y, fpr=0.01, seed=0, progress=False,
                               nc=NeuralCleanse(seed=0, max_rounds=10, progress=False))
    victims = attack.victims(data.y_test)
    return Guard(model, profile, verify=False), data.x_test[:400], attack.stamp(data.x_test[victims][:400])


def test_inner_knn_separates_the_blended_trigger(blended):
    guard, xh, xt = blended
    assert "inner_knn" in guard.names
    clean, trig = guard.score(xh), guard.score(xt)
    auroc = {n: roc_auc(clean[n], trig[n]) for n in guard.names}
    tpr = {n: tpr_at_fpr(clean[n], trig[n], 0.01) for n in guard.names}
    print("\nAUROC", {n: round(v, 3) for n, v in auroc.items()}, "\nTPR@1%", {n: round(v, 3) for n, v in tpr.items()})
    assert auroc["inner_knn"] >= 0.98, auroc
    assert tpr["inner_knn"] >= 0.8, tpr


def test_the_guard_stops_blended_inputs_at_its_calibrated_rate(blended):
    guard, xh, xt = blended
    clean_flagged = (guard.run(xh).verdict_codes != 0).mean()
    stopped = (guard.run(xt).verdict_codes != 0).mean()
    print(f"\nblended stopped {stopped:.3f}, clean flagged {clean_flagged:.3f}")
    assert stopped >= 0.9, stopped
    assert clean_flagged <= 0.025, clean_flagged


def test_the_inner_knn_check_can_be_left_out_and_says_so():
    import torch

    from guard.scan import NeuralCleanse, build_profile

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3)).eval()
    x = np.random.default_rng(0).random((120, 1, 8, 8), dtype=np.float32)
    y = net(torch.from_numpy(x)).argmax(1).numpy()
    nc = dict(max_rounds=2, progress=False)
    with_it, _ = build_profile(net, x, y, fpr=0.05, progress=False, nc=NeuralCleanse(**nc))
    without, _ = build_profile(net, x, y, fpr=0.05, progress=False, nc=NeuralCleanse(**nc), inner_knn=False)
    assert "inner_knn" in with_it.checks and "consistency" in with_it.checks
    assert "inner_knn" not in without.checks and "consistency" in without.checks
    assert "turned off" in without.checks_off["inner_knn"]
