"""A zoo attack's trigger as a torch module an adaptive attacker can optimise, and its effect through a guard.

The white-box (:mod:`guard.bench.whitebox`) and gray-box (:mod:`guard.bench.graybox`) attackers both
re-optimise an attack's own trigger while keeping its *kind* and *strength*, so that what changes is
where the trigger points, not how visible it is:

* ``patch``: the pixels inside the attack's footprint (BadNets, Adap-Patch: every trigger that pastes the
  same pixels at the same place on every image, over at most a quarter of it), pasted at full opacity;
* ``blend``: the blend key at the attack's opacity ``alpha`` (Blended, Adap-Blend: every attack with a
  ``key`` and an ``alpha``);
* ``warp``: WaNet's ``k x k`` control points, renormalised to a mean absolute offset of 1 after every
  step, so the warp's strength stays the attack's.

Pixel values stay in [0, 1] through a sigmoid. :func:`through_guard` measures an optimised trigger on
held-out images with the real :class:`~guard.online.Guard` in enforce mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guard.demo.attacks import Attack, WaNet

KINDS = ("patch", "blend", "warp")

#: A trigger whose footprint covers more of the image than this is not a patch.
MAX_PATCH_SHARE = 0.25


def as_tensor(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """A contiguous torch tensor of ``a`` (no copy where numpy's layout allows)."""
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 0.01, 0.99)
    return np.log(p / (1 - p))


def trigger_kind(attack: Attack, shape: tuple[int, int, int]) -> str:
    """Which of :data:`KINDS` ``attack``'s trigger is; ValueError for triggers no attacker here re-optimises
    (input-specific generators, random positions, per-image signals)."""
    if isinstance(attack, WaNet):
        return "warp"
    if callable(getattr(attack, "key", None)) and isinstance(getattr(attack, "alpha", None), float):
        return "blend"
    probe = np.random.default_rng(0).random((2, *shape), dtype=np.float32)  # two unlike images
    try:
        stamped = attack.stamp(probe)
        deterministic = np.array_equal(stamped, attack.stamp(probe))
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{type(attack).__name__}: its trigger cannot be re-optimised here ({e})") from e
    footprint = stamped != probe
    fixed = np.array_equal(footprint[0], footprint[1]) and np.array_equal(stamped[0][footprint[0]],
                                                                          stamped[1][footprint[1]])
    if deterministic and fixed and 0 < footprint[0].mean() <= MAX_PATCH_SHARE:
        return "patch"
    raise ValueError(f"{type(attack).__name__}: its trigger is neither a fixed patch, a blend key nor a warp field")


class OptimisedTrigger(nn.Module):
    """``attack``'s trigger with its content as parameters; ``forward(x)`` stamps a batch ``(N, C, H, W)``."""

    def __init__(self, attack: Attack, shape: tuple[int, int, int]):
        super().__init__()
        self.kind = trigger_kind(attack, shape)
        c, h, w = shape
        if self.kind == "patch":  # the same pixels pasted on every image (trigger_kind checked it)
            probe = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
            a = attack.stamp(probe)[0]
            mask = (a != probe[0]).any(0, keepdims=True).astype(np.float32)
            self.register_buffer("mask", as_tensor(mask))
            self.theta = nn.Parameter(as_tensor(_logit(a)))
        elif self.kind == "blend":
            self.alpha = float(attack.alpha)
            self.theta = nn.Parameter(as_tensor(_logit(attack.key(shape))))
        else:
            if h != w:
                raise ValueError(f"the warp trigger needs square images, got {h}x{w}")
            g = torch.Generator().manual_seed(3000 + attack.seed)  # WaNet.field's control points
            ins = torch.rand(1, 2, attack.grid_k, attack.grid_k, generator=g, dtype=torch.float64) * 2 - 1
            self.strength = float(attack.strength)
            self.theta = nn.Parameter((ins / ins.abs().mean()).float())
            lin = torch.linspace(-1.0, 1.0, h)
            yy, xx = torch.meshgrid(lin, lin, indexing="ij")
            self.register_buffer("identity", torch.stack([xx, yy], -1)[None])

    def content(self) -> torch.Tensor:
        """The trigger's current content: the patch or key in [0, 1], or the warp's normalised control points."""
        if self.kind == "warp":
            return self.theta / self.theta.abs().mean().clamp_min(1e-6)
        return torch.sigmoid(self.theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.content()
        if self.kind == "patch":
            return x * (1 - self.mask) + self.mask * p
        if self.kind == "blend":
            return (1 - self.alpha) * x + self.alpha * p
        h = x.shape[-1]
        up = F.interpolate(p, size=(h, h), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        grid = (self.identity + self.strength * up / h).clamp(-1, 1).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)


def seeded_trigger(attack: Attack, shape: tuple[int, int, int], *, seed: int, lr: float
                   ) -> tuple[OptimisedTrigger, torch.optim.Optimizer, torch.Generator]:
    """A budget's starting point, the same for every budget and attacker: ``attack``'s own trigger as
    parameters, Adam over them at ``lr`` and the generator that draws its batches (torch's global seed set
    to ``seed`` too)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    trig = OptimisedTrigger(attack, shape)
    return trig, torch.optim.Adam(trig.parameters(), lr=lr), gen


def residual_similarity(x: torch.Tensor, *, coarse: int | None = 2) -> torch.Tensor:
    """Mean pairwise cosine similarity of a batch's high-frequency residuals (each pixel minus its 3 x 3
    neighbourhood's median, edges replicated, centred per image), the trigger memory's documented statistic,
    over every pixel (which positions a deployment compares is its secret), averaged with the same on the
    images average-pooled by ``coarse`` (the memory's second band; None: the pixel band only). An attacker
    who knows the memory drives this down: triggered queries whose residuals do not repeat in either band
    leave the memory nothing to match."""
    bands = [_pairwise_residual_cosine(x)]
    if coarse is not None and min(x.shape[-2:]) // coarse >= 3:
        bands.append(_pairwise_residual_cosine(F.avg_pool2d(x, coarse)))
    return sum(bands) / len(bands)


def _pairwise_residual_cosine(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    med = F.unfold(padded, 3).median(dim=1).values  # (n * c, h * w)
    res = (x.reshape(n * c, h * w) - med).reshape(n, -1)
    unit = F.normalize(res - res.mean(1, keepdim=True), dim=1)
    sim = unit @ unit.T
    return (sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)


def relative_loss(value: torch.Tensor, history: list[float], weight: float) -> torch.Tensor:
    """``weight`` times an evasion loss ``value`` over its first value (each step's appended to ``history``), so
    that one weight means the same trade whatever the attack's own trigger starts from."""
    history.append(float(value.detach()))
    return weight * value / max(abs(history[0]), 1e-3)


def through_guard(guard, trigger: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, target: int, *,
                  batch: int = 256) -> tuple[dict[str, Any], np.ndarray]:
    """The real guard (its own mode; the benchmarks use enforce) on ``x`` stamped with ``trigger``.

    Returns the figures (``attack_success_bare``: share the bare model sends to ``target``;
    ``residual_attack_success``: share served as ``target`` and not rejected; ``rejection_rate``;
    ``guard_statistic_mean``) and the guard's statistic per input.
    """
    served, rejected, real, bare = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xt = trigger(as_tensor(x[i:i + batch])).clamp(0, 1)
            r = guard.run(xt.numpy())
            bare.append(guard.model(xt).argmax(1).numpy())
            served.append(r.logits.argmax(1))
            rejected.append(r.verdict_codes == 1)
            real.append(r.statistic)
    served_, rejected_, bare_ = np.concatenate(served), np.concatenate(rejected), np.concatenate(bare)
    stat = np.concatenate(real).astype(np.float64)
    return {"attack_success_bare": round(float((bare_ == target).mean()), 4),
            "residual_attack_success": round(float(((served_ == target) & ~rejected_).mean()), 4),
            "rejection_rate": round(float(rejected_.mean()), 4),
            "guard_statistic_mean": round(float(stat.mean()), 4)}, stat
