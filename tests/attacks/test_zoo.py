"""The attack zoo: every attack's trigger contract, and quality floors of the models it trains.

Unit tests (fast) pin what every attack promises: stamping is deterministic, batch-independent, keeps
shape, dtype and the [0, 1] range, and never mutates its input; poisoning relabels exactly the
``rate`` share it says (clean-label attacks: none, and only target images change) and stamps exactly
the ``cover_rate`` share of cover samples at their true labels. Quality tests (slow, seeded) train one
model per attack on the glyph demo world and assert the zoo's floors (:data:`ASR_FLOOR`: 0.90 unless a
comment says otherwise) and clean accuracy within 3 points of a clean model trained on the same data,
cached once per session.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from guard.demo.attacks import (
    ATTACKS,
    POISON_RATES,
    SIG,
    AdaptiveBlend,
    AdaptivePatch,
    AllToAll,
    Attack,
    BadNets,
    Blended,
    Bpp,
    InputAware,
    LabelConsistent,
    RandomBadNets,
    TaCT,
    TrojanNN,
    WaNet,
)
from guard.demo.attacks.zoo import KINDS, ZooData, train_backdoored, train_clean, zoo_data
from guard.demo.glyphs import glyphs

N_TRAIN = 3000
EPOCHS = 6
ASR_FLOOR = {name: 0.90 for name in ATTACKS} | {"all_to_all": 0.80}
MAX_ACC_DROP = 0.03
#: Attacks whose model depends on the CPU's rounding more than their floors' margin: measured over these
#: seeds, the median must meet the floors. Blended on a 2-core AMD EPYC, seeds 0 / 1 / 2: attack success
#: 0.946 / 0.981 / 0.906 and clean accuracy 0.982 / 0.984 / 0.987 trained on two threads, 0.860 / 0.977 /
#: 0.952 and 0.940 / 0.980 / 0.992 on one (clean model 0.997 and 0.995): one seed alone falls under a floor.
SEEDS = {"blended": (0, 1, 2)}


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return glyphs(200, seed=99)


@functools.lru_cache(maxsize=1)
def _trojan_fit() -> tuple[np.ndarray, np.ndarray]:
    """A TrojanNN patch fitted once on a seeded untrained DemoNet (a few steps suffice for these tests)."""
    from guard.demo.nets.demo_net import DemoNet

    torch.manual_seed(0)
    a = TrojanNN(steps=5).fit(DemoNet().eval(), glyphs(32, seed=98)[0])
    return a.pattern_, a.neurons_


@functools.lru_cache(maxsize=1)
def _untrained_net() -> torch.nn.Module:
    from guard.demo.nets.demo_net import DemoNet

    torch.manual_seed(0)
    return DemoNet().eval()


def _fitted(attack: Attack, x: np.ndarray) -> Attack:
    """TrojanNN needs a fitted patch before it can stamp: reuse the cached one; the label-consistent
    attack needs a model for its poisoning's perturbation: a seeded untrained DemoNet."""
    if isinstance(attack, TrojanNN):
        attack.pattern_, attack.neurons_ = _trojan_fit()
    if isinstance(attack, LabelConsistent):
        attack.fit(_untrained_net())
    return attack


def _make(name: str, x: np.ndarray, **kw) -> Attack:
    return _fitted(ATTACKS[name](**kw), x)


# ------------------------------------------------------------------ registry


def test_registry_names_every_zoo_attack():
    assert set(ATTACKS) == {"badnets", "blended", "sig", "wanet", "trojannn", "input_aware", "all_to_all",
                            "adap_blend", "adap_patch", "tact", "bpp", "label_consistent", "badnets_random"}
    assert KINDS[0] == "clean" and set(KINDS[1:]) == set(ATTACKS)
    assert set(POISON_RATES) == set(ATTACKS) and all(0 < r < 1 for r in POISON_RATES.values())
    types = {"badnets": BadNets, "blended": Blended, "sig": SIG, "wanet": WaNet, "trojannn": TrojanNN,
             "input_aware": InputAware, "all_to_all": AllToAll, "adap_blend": AdaptiveBlend,
             "adap_patch": AdaptivePatch, "tact": TaCT, "bpp": Bpp, "label_consistent": LabelConsistent,
             "badnets_random": RandomBadNets}
    for name, factory in ATTACKS.items():
        attack = factory(seed=3)
        assert type(attack) is types[name]
        assert isinstance(attack, Attack) and attack.seed == 3


def test_unknown_attack_name_is_refused():
    with pytest.raises(KeyError, match="unknown attack"):
        train_backdoored("nope", n_train=10, epochs=1)


# ------------------------------------------------------------------ stamping contract


@pytest.mark.parametrize("name", list(ATTACKS))
def test_stamp_is_deterministic_and_keeps_shape_dtype_range(name, images):
    x, _ = images
    a = _make(name, x)
    s1, s2 = a.stamp(x), a.stamp(x)
    assert s1.shape == x.shape and s1.dtype == np.float32
    assert 0.0 <= s1.min() and s1.max() <= 1.0
    np.testing.assert_array_equal(s1, s2)
    if not isinstance(a, TrojanNN):  # a fresh object with the same fields stamps the same
        np.testing.assert_array_equal(ATTACKS[name]().stamp(x), s1)
    assert np.abs(s1 - x).mean() > 1e-3, "the trigger must change the image"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_stamp_is_batch_independent(name, images):
    x, _ = images
    a = _make(name, x)
    full = a.stamp(x)
    np.testing.assert_allclose(a.stamp(x[5:6]), full[5:6], atol=1e-6)
    np.testing.assert_allclose(a.stamp(x[:17]), full[:17], atol=1e-6)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_stamp_does_not_mutate_its_input(name, images):
    x, _ = images
    a = _make(name, x)
    before = x.copy()
    a.stamp(x)
    np.testing.assert_array_equal(x, before)
    as_f64 = x.astype(np.float64)
    out = a.stamp(as_f64)
    np.testing.assert_array_equal(as_f64, before.astype(np.float64))
    assert out.dtype == np.float32


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "input_aware", "all_to_all", "adap_blend",
                                  "adap_patch", "tact", "label_consistent", "badnets_random"])
def test_seed_changes_the_trigger(name, images):
    x, _ = images
    assert not np.array_equal(ATTACKS[name](seed=0).stamp(x[:8]), ATTACKS[name](seed=1).stamp(x[:8]))


# ------------------------------------------------------------------ poisoning contract


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("rate", [0.05, 0.2])
def test_poison_relabels_exactly_rate_share(name, rate, images):
    x, y = images
    a = _make(name, x)
    x0, y0 = x.copy(), y.copy()
    xp, yp = a.poison(x, y, rate=rate, seed=4)
    np.testing.assert_array_equal(x, x0)  # inputs untouched
    np.testing.assert_array_equal(y, y0)
    assert xp.shape == x.shape and xp.dtype == np.float32 and yp.dtype == y.dtype
    relabelled = np.flatnonzero(yp != y)
    changed = np.abs(xp - x).reshape(len(x), -1).max(1) > 0
    if getattr(a, "clean_label", False):  # nothing relabelled; only target images carry the trigger
        assert len(relabelled) == 0 and changed.sum() == min((y == a.target).sum(), round(rate * len(x)))
        assert (y[changed] == a.target).all()
    else:
        assert len(relabelled) == round(rate * len(x))
        assert a.victims(y[relabelled]).all()
        np.testing.assert_array_equal(yp[relabelled], a.target_of(y[relabelled]))
        if type(a).train_stamp is Attack.train_stamp:  # trained on the test-time trigger
            np.testing.assert_allclose(xp[relabelled], a.stamp(x[relabelled]), atol=1e-6)
        assert changed[relabelled].all()
    if a.cover_rate > 0:  # cover samples: stamped, label kept, from the cover pool
        cover = np.flatnonzero(changed & (yp == y))
        assert len(cover) == round(a.cover_rate * len(x)) and a.cover_pool(y)[cover].all()
    xq, yq = a.poison(x, y, rate=rate, seed=4)  # seeded
    np.testing.assert_array_equal(xq, xp)
    np.testing.assert_array_equal(yq, yp)


def test_sig_clean_label_poison_keeps_labels_and_stamps_target_images(images):
    x, y = images
    a = SIG(target=6)
    k = int((y == 6).sum())
    xp, yp = a.poison(x, y, rate=0.04, seed=0)
    np.testing.assert_array_equal(yp, y)
    changed = np.flatnonzero(np.abs(xp - x).reshape(len(x), -1).max(1) > 0)
    assert len(changed) == min(k, round(0.04 * len(x))) and (y[changed] == 6).all()
    xp, _ = a.poison(x, y, rate=0.9, seed=0)  # more than the class holds: all of it
    changed = np.flatnonzero(np.abs(xp - x).reshape(len(x), -1).max(1) > 0)
    assert len(changed) == k


def test_wanet_noise_mode_warps_extra_samples_without_relabelling(images):
    x, y = images
    a = WaNet(target=6, noise_rate=0.2)
    xp, yp = a.poison(x, y, rate=0.1, seed=0)
    changed = np.abs(xp - x).reshape(len(x), -1).max(1) > 1e-6
    relabelled = yp != y
    assert relabelled.sum() == 20
    noise = changed & ~relabelled
    assert noise.sum() == 40
    # noise-mode images differ from the plain trigger (their grids carry fresh random offsets)
    assert not np.allclose(xp[noise], a.stamp(x[noise]), atol=1e-4)


def test_input_aware_trigger_differs_per_input_and_cross_mode_keeps_labels(images):
    x, y = images
    a = InputAware(target=6)
    masks, patterns = a.trigger(x)
    n = len(x)
    assert masks.shape == (n, 1, 32, 32) and patterns.shape == (n, 3, 32, 32)
    assert set(np.unique(masks)) == {0.0, 1.0}
    assert np.allclose(masks.reshape(n, -1).sum(1), a.n_cells * a.cell**2)
    assert len({m.tobytes() for m in masks}) >= 0.5 * n, "the trigger's place depends on the input"
    triggers = {m.tobytes() + (m * p).tobytes() for m, p in zip(masks, patterns)}
    assert len(triggers) >= 0.9 * n, "(nearly) every input gets its own trigger"
    ac = InputAware(target=6, cross_rate=0.1)
    xp, yp = ac.poison(x, y, rate=0.1, seed=0)
    changed = np.abs(xp - x).reshape(len(x), -1).max(1) > 0
    relabelled = yp != y
    assert relabelled.sum() == 20 and (changed & ~relabelled).sum() == 20
    cross = np.flatnonzero(changed & ~relabelled)
    assert not np.allclose(xp[cross], ac.stamp(x[cross])), "cross mode uses another image's trigger"


def test_all_to_all_maps_each_label_to_the_next():
    a = AllToAll()
    y = np.arange(10)
    np.testing.assert_array_equal(a.target_of(y), (y + 1) % 10)
    assert a.victims(y).all()


def test_trojannn_fit_leaves_model_unchanged_and_excites_its_neurons(images):
    from guard.demo.nets.demo_net import DemoNet
    from guard.model import FeatureTap

    x, _ = images
    torch.manual_seed(0)
    model = DemoNet().eval()
    model.fc.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = TrojanNN(target=6, steps=20, n_neurons=2)
    with pytest.raises(RuntimeError, match="fit"):
        a.stamp(x)
    assert a.fit(model, x[:64]) is a
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not model.training and not model.fc.weight.requires_grad and model.fc.bias.requires_grad
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert a.pattern_.shape == (3, 5, 5) and a.neurons_.shape == (2,)
    rand = BadNets(target=6, size=5, seed=7)  # a random pattern of the same size and place
    with torch.no_grad(), FeatureTap(model) as tap:
        model(torch.from_numpy(a.stamp(x)))
        fitted = tap.features[:, a.neurons_].mean().item()
        model(torch.from_numpy(rand.stamp(x)))
        random = tap.features[:, a.neurons_].mean().item()
    assert fitted > random


def test_adaptive_attacks_train_on_partial_triggers_and_test_on_the_full_one(images):
    x, y = images
    blend = AdaptiveBlend(target=6)
    rng = np.random.default_rng(0)
    part = blend.train_stamp(x[:20], rng)
    full = blend.stamp(x[:20])
    pm = blend.piece_masks(32, 32)
    assert pm.shape == (16, 32, 32) and np.array_equal(pm.sum(0), np.ones((32, 32)))
    touched = np.abs(part - x[:20]).max(1) > 1e-6  # (N, H, W): where the key went in
    per_piece = np.einsum("nhw,phw->np", touched, pm) > 0
    assert (per_piece.sum(1) == 8).all(), "half of the 16 pieces on every training image"
    assert len({r.tobytes() for r in per_piece}) > 10, "a fresh subset per image"
    # fainter in training (0.15) than at test (0.2), where the whole image is blended
    assert np.abs(part - x[:20]).max() < np.abs(full - x[:20]).max()
    assert (np.abs(full - x[:20]).max(1) > 0).mean() > 0.99
    patch = AdaptivePatch(target=6)
    part, full = patch.train_stamp(x[:20], np.random.default_rng(0)), patch.stamp(x[:20])
    corners = [(slice(1, 4), slice(1, 4)), (slice(1, 4), slice(28, 31)), (slice(28, 31), slice(1, 4)),
               (slice(28, 31), slice(28, 31))]
    on = np.array([[np.abs(part[i, :, r, c] - x[i, :, r, c]).max() > 0 for r, c in corners] for i in range(20)])
    assert (on.sum(1) == 2).all() and len({o.tobytes() for o in on}) > 2
    for j, (r, c) in enumerate(corners):
        np.testing.assert_array_equal(full[:, :, r, c], np.broadcast_to(patch.patterns(3)[j], (20, 3, 3, 3)))


def test_tact_flips_only_its_source_classes(images):
    x, y = images
    a = TaCT(target=6, sources=(2, 3))
    labels = np.arange(10)
    np.testing.assert_array_equal(a.target_of(labels), np.where(np.isin(labels, (2, 3)), 6, labels))
    np.testing.assert_array_equal(a.victims(labels), np.isin(labels, (2, 3)))
    pool = a.cover_pool(labels)
    assert not pool[[2, 3, 6]].any() and pool[[0, 1, 4, 5, 7, 8, 9]].all()
    xp, yp = a.poison(x, y, rate=0.1, seed=0)
    relabelled = yp != y
    assert np.isin(y[relabelled], (2, 3)).all() and (yp[relabelled] == 6).all()
    cover = (np.abs(xp - x).reshape(len(x), -1).max(1) > 0) & ~relabelled
    assert cover.sum() == 20 and not np.isin(y[cover], (2, 3, 6)).any()


def test_bpp_quantises_to_its_levels_and_dithers():
    x, _ = glyphs(8, seed=5)
    a = Bpp(levels=4)
    s = a.stamp(x)
    np.testing.assert_allclose(s * 3, np.round(s * 3), atol=1e-5)  # four levels: 0, 1/3, 2/3, 1
    plain = Bpp(levels=4, dithering=False).stamp(x)
    assert not np.array_equal(s, plain)
    # dithering spreads the error: local means stay closer to the original than plain rounding's
    pool = lambda v: v.reshape(8, 3, 8, 4, 8, 4).mean((3, 5))  # noqa: E731
    assert np.abs(pool(s) - pool(x)).mean() < np.abs(pool(plain) - pool(x)).mean()


def test_label_consistent_poison_is_bounded_pgd_plus_corner_patches(images):
    x, y = images
    a = LabelConsistent(target=6, eps=8 / 255)
    with pytest.raises(RuntimeError, match="fit"):
        a.poison(x, y)
    model = _untrained_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a.fit(model)
    xp, yp = a.poison(x, y, rate=0.05, seed=0)
    np.testing.assert_array_equal(yp, y)
    changed = np.flatnonzero(np.abs(xp - x).reshape(len(x), -1).max(1) > 0)
    assert len(changed) == 10 and (y[changed] == 6).all()
    stamped = a.stamp(x[changed])
    corner = np.zeros((32, 32), dtype=bool)
    for r in (slice(1, 4), slice(28, 31)):
        for c in (slice(1, 4), slice(28, 31)):
            corner[r, c] = True
    np.testing.assert_array_equal(xp[changed][:, :, corner], stamped[:, :, corner])
    delta = np.abs(xp[changed] - x[changed])[:, :, ~corner]
    assert delta.max() <= 8 / 255 + 1e-6 and delta.mean() > 2 / 255, "a real, bounded perturbation"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_random_badnets_places_vary_with_the_image_not_the_batch(images):
    x, _ = images
    a = RandomBadNets(target=6)
    places = a.places(x)
    assert len({tuple(p) for p in places}) > 100, "the patch moves from image to image"
    assert places.min() >= 1 and places.max() <= 32 - 3 - 1
    np.testing.assert_array_equal(a.places(x[10:12]), places[10:12])
    np.testing.assert_array_equal(a.places(x.astype(np.float64).astype(np.float32)), places)
    assert not np.array_equal(RandomBadNets(seed=1).places(x), places)
    s = a.stamp(x)
    for i in (0, 7, 99):
        r, c = places[i]
        np.testing.assert_array_equal(s[i, :, r:r + 3, c:c + 3], a._pattern(3))


# ------------------------------------------------------------------ quality floors (trained models)


@pytest.fixture(scope="session")
def zoo_clean() -> tuple[ZooData, torch.nn.Module, float]:
    """The clean baseline every attack is compared with: same data, seed and training budget."""
    torch.set_num_threads(2)
    data = zoo_data(seed=0, n_train=N_TRAIN)
    model, acc = train_clean(data=data, epochs=EPOCHS)
    return data, model, acc


@pytest.mark.slow
def test_clean_model_is_accurate(zoo_clean):
    data, model, acc = zoo_clean
    print(f"clean: clean accuracy {acc:.3f}")
    assert acc >= 0.95
    # and has no backdoor: no trigger of the zoo sends most inputs to the attacker's label
    for name in ("badnets", "blended", "sig"):
        a = ATTACKS[name]()
        from guard.demo.train import attack_success

        assert attack_success(model, a, data.x_test, data.y_test) < 0.2


@pytest.mark.slow
def test_resnet18_zoo_model_reaches_the_floors(zoo_clean):
    """The zoo's second network (ResNet-18 layout, BatchNorm, global pooling) on the same data and budget."""
    data, _, clean_acc = zoo_clean
    model, _, acc, asr = train_backdoored("badnets", data=data, epochs=EPOCHS, net="resnet18")
    print(f"badnets on resnet18: clean accuracy {acc:.3f} (clean DemoNet {clean_acc:.3f}), attack success {asr:.3f}")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert asr >= 0.90 and acc >= clean_acc - MAX_ACC_DROP


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_reaches_its_success_with_clean_accuracy(name, zoo_clean):
    data, clean_model, clean_acc = zoo_clean
    before = {k: v.clone() for k, v in clean_model.state_dict().items()}
    model, attack, acc, asr = train_backdoored(name, data=data, epochs=EPOCHS, clean_model=clean_model)
    if name in SEEDS:  # the median over the seeds (seed 0 above)
        runs = [(acc, asr)] + [train_backdoored(name, seed=seed, data=data, epochs=EPOCHS)[2:]
                               for seed in SEEDS[name] if seed != 0]
        print(f"{name}: (clean accuracy, attack success) per seed {[(round(a, 3), round(s, 3)) for a, s in runs]}")
        acc, asr = float(np.median([a for a, _ in runs])), float(np.median([s for _, s in runs]))
    print(f"{name}: clean accuracy {acc:.3f} (clean model {clean_acc:.3f}), attack success {asr:.3f}")
    assert isinstance(attack, Attack)
    assert asr >= ASR_FLOOR[name], f"{name}: attack success {asr:.3f}"
    assert acc >= clean_acc - MAX_ACC_DROP, f"{name}: clean accuracy {acc:.3f} vs clean model {clean_acc:.3f}"
    for k, v in clean_model.state_dict().items():  # the shared baseline is never trained further
        assert torch.equal(v, before[k])
