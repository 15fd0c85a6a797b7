"""STRIP (Gao et al., ACSAC 2019), reproduced as the benchmark's peer, and ART's STRIP where installed.

"STRIP: A Defence Against Trojan Attacks on Deep Neural Networks": superimpose the incoming image on
``N = 100`` clean held-out images, classify all of them and sum the Shannon entropy (bits) of the
predicted distributions, divided by ``N``. A trojaned input keeps predicting the target whatever is
superimposed (low entropy); a clean input's prediction scatters (high entropy). The detection boundary
is set on clean held-out inputs at a false rejection rate (FRR) of 1%: the paper fits a normal
distribution to the clean entropies and takes its 1% percentile; :attr:`Strip.threshold_` is that.

Superimposition: the reference code adds the two images (``cv2.addWeighted(bg, 1, ov, 1, 0)``) on
mean-normalised inputs; on raw [0, 1] pixels a plain sum leaves the input range the model was trained
on, so this uses the average of the two (the sum scaled by 1/2, as ART's ``combine_images`` does).
Every draw of superimposed images is seeded. Scores are returned as *negative* entropy, so that, as
for every guard check, higher means more suspect.

:func:`art_strip` runs the Adversarial Robustness Toolbox's own STRIP (``art.defences.transformer.
poisoning.STRIP``) on the same model and inputs when the ``[bench]`` extra is installed.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

import numpy as np
import torch
from torch import nn


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of probabilities (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log2(p), 0.0)
    return -t.sum(-1)


class Strip:
    """STRIP detector: ``fit`` on clean held-out images, ``score`` (negative normalised entropy).

    ``n`` superimpositions per input (the paper's 100), ``frr`` the false rejection rate the boundary
    is set at, ``batch_size`` how many superimposed images go through the model per forward pass.
    Learned: ``pool_`` (the clean images superimposed on inputs), ``threshold_`` (a score above it is
    flagged), ``clean_mean_``/``clean_std_`` (the normal fit of the clean entropies), ``seconds_``.

    Parameters
    ----------
    n
        Superimposed copies per input, each with a clean pool image drawn at random; the paper's 100.
    frr
        False rejection rate the boundary is set at (the point of the normal fit to the clean
        entropies); the paper's 0.01.
    batch_size
        Superimposed images per forward pass (``batch_size // n`` inputs, at least one); 1000.
    seed
        Seeds the draws of pool images (the calibration's apart from the scoring's).
    """

    def __init__(self, *, n: int = 100, frr: float = 0.01, batch_size: int = 1000, seed: int = 0):
        self.n = n
        self.frr = frr
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, model: nn.Module, pool: np.ndarray, calibration: np.ndarray) -> Strip:
        """Keep ``pool`` (clean held-out images) and set the boundary on ``calibration`` (other clean images)."""
        from scipy.stats import norm

        t0 = time.perf_counter()
        self.model_ = model
        self.pool_ = np.ascontiguousarray(pool, dtype=np.float32)
        ent = -self.score(calibration, seed_offset=1)
        self.clean_mean_, self.clean_std_ = float(ent.mean()), float(ent.std())
        # the paper: entropy below the FRR percentile of the normal fit to clean entropies is trojaned
        self.threshold_ = -float(norm.ppf(self.frr, loc=self.clean_mean_, scale=max(self.clean_std_, 1e-12)))
        self.seconds_ = time.perf_counter() - t0
        return self

    def score(self, x: np.ndarray, *, seed_offset: int = 0) -> np.ndarray:
        """Negative mean entropy (bits) over ``n`` superimpositions per input: higher = more suspect."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rng = np.random.default_rng(self.seed * 1000 + seed_offset)
        draws = rng.integers(0, len(self.pool_), size=(len(x), self.n))
        per = max(1, self.batch_size // self.n)  # inputs per forward pass
        out = np.empty(len(x), dtype=np.float64)
        was_training = self.model_.training
        self.model_.eval()
        try:
            with torch.inference_mode():
                for i in range(0, len(x), per):
                    xb = x[i:i + per]
                    mixed = 0.5 * xb[:, None] + 0.5 * self.pool_[draws[i:i + per]]  # (b, n, C, H, W)
                    logits = self.model_(torch.from_numpy(mixed.reshape(-1, *x.shape[1:])))
                    p = torch.softmax(logits.double(), 1).numpy().reshape(len(xb), self.n, -1)
                    out[i:i + len(xb)] = _entropy_bits(p).sum(1) / self.n
        finally:
            self.model_.train(was_training)
        return -out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Flagged as trojaned (entropy below the paper's boundary)."""
        return self.score(x) > self.threshold_


def _quiet_tqdm() -> None:
    """ART draws tqdm bars on stderr; tqdm reads ``TQDM_DISABLE`` when it is first imported."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")


def art_available() -> tuple[bool, str]:
    """Whether ART's STRIP can be imported here, and why not if it cannot."""
    _quiet_tqdm()
    try:
        from art.defences.transformer.poisoning import STRIP  # noqa: F401
        from art.estimators.classification import PyTorchClassifier  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return False, f"adversarial-robustness-toolbox not importable: {type(e).__name__}: {e}"
    return True, ""


def art_strip(model: nn.Module, pool: np.ndarray, x_neg: np.ndarray, x_pos: np.ndarray, *, n: int = 100,
              far: float = 0.01, seed: int = 0, num_classes: int = 10) -> dict[str, Any]:
    """ART's STRIP on the same model and inputs: its own boundary, its decisions and its statistic.

    ``STRIP(classifier)(num_samples=n, false_acceptance_rate=far)`` wraps an ART ``PyTorchClassifier``;
    ``mitigate(pool)`` fits its boundary (a normal fit of the pool's entropies, the ``far`` point) and
    ``predict`` abstains (an all-zero row) on inputs it judges trojaned. ART's statistic differs from
    the paper's: it calls ``scipy.stats.entropy(preds, base=2, axis=0)``, the entropy of each *class's*
    probabilities across the ``n`` superimposed copies, summed over classes. To rank inputs (AUROC)
    without re-implementing it, ``entropy`` is wrapped in ART's module for the duration of ``predict``
    and the per-input statistic it computes is recorded; the decisions are ``predict``'s own. ART
    draws with the global numpy RNG, which is seeded here.
    """
    import logging

    _quiet_tqdm()
    from art.defences.transformer.poisoning import STRIP
    from art.estimators.poison_mitigation.strip import strip as art_strip_module

    logging.getLogger("art").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    np.random.seed(seed)
    classifier = _art_classifier(model, pool.shape[1:], num_classes)
    defended = STRIP(classifier)(num_samples=n, false_acceptance_rate=far)
    with contextlib.redirect_stderr(io.StringIO()):  # mitigate() draws a tqdm bar
        defended.mitigate(np.ascontiguousarray(pool, dtype=np.float32))
    original = art_strip_module.entropy

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seen: list[float] = []

        def recording(*args: Any, **kwargs: Any) -> np.ndarray:
            value = original(*args, **kwargs)
            seen.append(float(np.sum(value)) / float(n))
            return value

        art_strip_module.entropy = recording
        try:
            pred = defended.predict(np.ascontiguousarray(x, dtype=np.float32))
        finally:
            art_strip_module.entropy = original
        if len(seen) != len(x):
            raise RuntimeError(f"ART STRIP computed {len(seen)} statistics for {len(x)} inputs")
        return ~pred.any(1), -np.asarray(seen)

    neg_flag, neg_s = run(x_neg)
    pos_flag, pos_s = run(x_pos)
    return {"threshold_entropy": float(defended.entropy_threshold), "neg_flagged": neg_flag, "pos_flagged": pos_flag,
            "neg_scores": neg_s, "pos_scores": pos_s, "seconds": time.perf_counter() - t0}


def _art_classifier(model: nn.Module, input_shape: tuple[int, ...], num_classes: int):
    """An ART ``PyTorchClassifier`` over ``model`` that returns probabilities (STRIP needs them)."""
    from art.estimators.classification import PyTorchClassifier

    class _Softmax(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.inner(x), 1)

    return PyTorchClassifier(model=_Softmax(model).eval(), loss=nn.CrossEntropyLoss(),
                             input_shape=tuple(input_shape), nb_classes=num_classes, clip_values=(0.0, 1.0),
                             device_type="cpu")
