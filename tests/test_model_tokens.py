"""Token statistics of a transformer's blocks (guard.model.tokens), the tap that carries them in the inner
row, the token check that reads them, and their place in a profile."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from guard import Guard, Profile
from guard.errors import ProfileError
from guard.model import FeatureTap, token_blocks
from guard.model.tokens import TokenStatistics, pick_blocks
from guard.online.checks import TokenCheck
from guard.scan import NeuralCleanse, build_profile, records


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, t):
        return t + torch.tanh(self.fc(self.norm(t)))


class TinyTokens(nn.Module):
    """Patch embedding (4x4 patches of a 16x16 image: 16 tokens), three residual blocks in a ModuleList,
    tokens averaged (no class token), a linear head."""

    def __init__(self, d=12, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(1, d, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 16, d) * 0.1)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(3)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for b in self.blocks:
            t = b(t)
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyTokens().eval()
    x = np.random.default_rng(0).random((300, 1, 16, 16), dtype=np.float32) * 0.5
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    return model, x, y


def _patched(x, value=1.0):
    """A bright 3x3 corner patch: one token (the last) unlike any clean one."""
    out = x.copy()
    out[..., -3:, -3:] = value
    return out


def test_pick_blocks_spreads_over_the_depth():
    names = [f"b{i}" for i in range(12)]
    assert pick_blocks(names) == ["b0", "b4", "b7", "b11"]
    assert pick_blocks(names[:3]) == names[:3]


def test_statistic_is_about_one_on_clean_tokens_and_large_on_an_odd_token(tiny):
    model, x, _ = tiny
    blocks = token_blocks(model, torch.from_numpy(x[:1]), "head")
    assert blocks == ["blocks.0", "blocks.1", "blocks.2"]
    stats = TokenStatistics().fit(model, x[:200], blocks)
    with FeatureTap(model, "head", tokens=stats) as tap, torch.no_grad():
        model(torch.from_numpy(x[200:]))
        clean = torch.stack(tap._stats, 1).numpy()
        model(torch.from_numpy(_patched(x[200:])))
        odd = torch.stack(tap._stats, 1).numpy()
    assert clean.shape == (100, 3)
    # the largest of 16 tokens' mean squared whitened deviations: a little above 1 on clean images
    assert 0.5 < np.median(clean) < 5, np.median(clean, 0)
    assert (odd.min(0) > 2 * np.quantile(clean, 0.99, axis=0)).all(), (odd.min(0), np.quantile(clean, 0.99, axis=0))


def test_statistics_round_trip_and_refuse_mismatched_arrays(tiny):
    model, x, _ = tiny
    stats = TokenStatistics().fit(model, x[:200], ["blocks.0", "blocks.2"])
    blocks, tensors = stats.to_profile()
    again = TokenStatistics.from_profile(blocks, tensors)
    t = torch.randn(5, 16, 12)
    torch.testing.assert_close(again.statistic(1, t), stats.statistic(1, t))
    with pytest.raises(ValueError, match="disagree"):
        TokenStatistics.from_profile(blocks, {**tensors, "whiten.1": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="not tokens"):
        TokenStatistics().fit(model, x[:10], ["embed"])


def test_tap_carries_the_statistics_as_the_inner_rows_last_channels_and_removes_its_hooks(tiny):
    model, x, _ = tiny
    stats = TokenStatistics().fit(model, x[:200], ["blocks.0", "blocks.1", "blocks.2"])
    inner = model.blocks[0]
    with FeatureTap(model, "head", inner=inner, tokens=stats) as tap, torch.no_grad():
        model(torch.from_numpy(x[:4]))
        got = tap.inner
        expected = torch.stack(tap._stats, 1)
    assert got.shape == (4, 2 * 12 + 3, 16, 1)
    torch.testing.assert_close(got[:, -3:, 0, 0], expected)
    assert all(not b._forward_hooks for b in model.blocks)


def test_token_check_scores_each_block_in_units_of_its_clean_scale():
    rng = np.random.default_rng(0)
    n, c = 200, 5  # the pooled row: 5 channels' means, then their maxes; the last two are block statistics
    g = rng.random((n, 2 * c)).astype(np.float32)
    g[:, 3], g[:, 4] = rng.uniform(0, 1, n), rng.uniform(0, 10, n)
    from guard.online import Record

    rec = Record(np.zeros((n, 1, 2, 2), np.float32), rng.random((n, 3)).astype(np.float32),
                 rng.random((n, 4)).astype(np.float32), g)
    check = TokenCheck(blocks=2).fit(rec)
    assert check.first_ == 3
    np.testing.assert_allclose(check.scale_, np.quantile(g[:, 3:5], 0.99, axis=0), rtol=1e-6)
    expected = np.maximum(g[:, 3] / check.scale_[0], g[:, 4] / check.scale_[1])
    np.testing.assert_allclose(check.score(rec), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        TokenCheck(blocks=9).fit(rec)


@pytest.fixture(scope="module")
def tiny_profile(tiny):
    model, x, y = tiny
    profile, _ = build_profile(model, x, y, fpr=0.02, seed=0, progress=False,
                               nc=NeuralCleanse(max_rounds=2, progress=False))
    return profile


def test_scan_of_a_token_model_adds_the_token_check_and_the_guard_reads_it(tiny, tiny_profile, tmp_path):
    model, x, _ = tiny
    assert tiny_profile.token_blocks == ["blocks.0", "blocks.1", "blocks.2"]
    assert "token" in tiny_profile.checks
    tiny_profile.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "profile.json").read_text())["token_blocks"] == tiny_profile.token_blocks
    loaded = Profile.load(tmp_path / "p")
    guard = Guard(model, loaded)
    assert guard.token_statistics.blocks_ == tiny_profile.token_blocks
    j = guard.names.index("token")
    clean = guard.run(x[:100]).scores[:, j]
    odd = guard.run(_patched(x[:100])).scores[:, j]
    assert np.median(odd) > 3 * np.quantile(clean, 0.99), (np.median(odd), np.quantile(clean, 0.99))
    one = np.array([guard.run(x[i:i + 1]).scores[0, j] for i in range(3)])  # the batch-1 path agrees
    np.testing.assert_allclose(one, clean[:3], rtol=1e-4)
    rec = records(model, x[:3], layer="head", inner=loaded.inner_layer)  # without the statistics: no token rows
    assert rec.inner.shape[1] == 2 * 2 * 12


def test_a_profile_with_broken_token_statistics_is_refused(tiny, tiny_profile):
    model, _, _ = tiny
    broken = Profile(**{**vars(tiny_profile), "tensors": {k: v for k, v in tiny_profile.tensors.items()
                                                          if k != "tokens.whiten.1"}})
    with pytest.raises(ProfileError, match="token statistics"):
        Guard(model, broken)


def test_a_cnn_profile_has_no_token_blocks(clean_scan):
    assert clean_scan.profile.token_blocks is None
    assert "token_blocks" not in clean_scan.profile.to_json() and "token" not in clean_scan.profile.checks


def test_white_box_surrogate_reproduces_the_token_check(tiny, tiny_profile):
    """The bench's white-box attacker sees the token check: its torch score is the guard's."""
    from guard.bench.whitebox import SURROGATES, Surrogate

    model, x, _ = tiny
    guard = Guard(model, tiny_profile)
    sur = Surrogate(guard)
    assert "token" in sur.in_surrogate
    j = guard.names.index("token")
    batch = np.concatenate([x[:40], _patched(x[:40])])
    score = SURROGATES["token"](guard.checks[j].params())
    with FeatureTap(model, "head", inner=model.blocks[0], tokens=guard.token_statistics) as tap, torch.no_grad():
        model(torch.from_numpy(batch))
        a = tap.inner.reshape(len(batch), tap.inner.shape[1], -1)
        g = torch.cat([a.mean(2), a.amax(2)], 1)
    np.testing.assert_allclose(score(None, None, None, g).numpy(), guard.run(batch).scores[:, j], rtol=1e-4)


def test_fit_leaves_no_hook_behind_when_a_block_is_not_a_module_or_not_tokens(tiny):
    model, x, _ = tiny
    with pytest.raises(AttributeError):
        TokenStatistics().fit(model, x[:8], ["blocks.0", "blocks.9"])  # the second does not exist
    with pytest.raises(ValueError, match="not tokens"):
        TokenStatistics().fit(model, x[:8], ["blocks.1", "embed"])  # a (N, C, H, W) map, not (N, T, D)
    assert all(not m._forward_hooks for m in model.modules())
