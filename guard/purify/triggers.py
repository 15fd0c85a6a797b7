"""Triggers to unlearn and to score a purified model with: the profile's reversed triggers, stamped
where they were found or pasted anywhere (or, for a warping trigger, the reversed displacement field
applied), and the one function that measures a trigger's success.

A reversed trigger is *one* trigger that works, not the attacker's (docs/design.md). On a model that
pools globally the backdoor fires wherever its pattern sits, and the reversal often settles on a
spot away from the real patch, so unlearning it only where it was found teaches the wrong lesson:
with ``anywhere`` the reversed trigger's footprint (its bounding box) is pasted at a random place on
every stamped image, so what is unlearned is the pattern, not its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from guard.scan.warp import warp


@dataclass
class Trigger:
    """A mask ``(1, H, W)`` and pattern ``(C, H, W)`` in raw pixel space, stamped where it was found
    (moved by up to ``jitter`` pixels) or, with ``anywhere``, its bounding box pasted at a random place.

    A warping trigger (:meth:`warping`) has a displacement ``field`` ``(2, H, W)`` in pixels instead
    (:func:`guard.scan.warp.warp`), applied scaled by a factor drawn log-uniformly from ``1/spread`` to
    ``spread``; its mask and pattern are empty and it has no place to move."""

    mask: torch.Tensor
    pattern: torch.Tensor
    anywhere: bool = False
    jitter: int = 0
    field: torch.Tensor | None = None
    spread: float = 1.0

    @classmethod
    def of(cls, mask: np.ndarray, pattern: np.ndarray, **kw) -> Trigger:
        m, p = (torch.as_tensor(np.asarray(a, np.float32)) for a in (mask, pattern))
        return cls(m, p, **kw)

    @classmethod
    def warping(cls, field: np.ndarray | torch.Tensor, *, spread: float = 1.0) -> Trigger:
        """A warping trigger: every image resampled through the displacement ``field`` ``(2, H, W)``, scaled
        by up to ``spread`` times either way (1: as found)."""
        f = torch.as_tensor(np.asarray(field, np.float32))
        if f.ndim != 3 or f.shape[0] != 2:
            raise ValueError(f"a warp field is (2, H, W), got {tuple(f.shape)}")
        if spread < 1:
            raise ValueError(f"spread must be at least 1, got {spread}")
        return cls(torch.zeros((0,)), torch.zeros((0,)), field=f, spread=float(spread))

    def crop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounding box of the mask's support (pixels at >= 10% of its maximum)."""
        m = self.mask[0]
        on = torch.nonzero(m >= 0.1 * m.max())
        if len(on) == 0:
            return self.mask, self.pattern
        (r0, c0), (r1, c1) = on.min(0).values.tolist(), on.max(0).values.tolist()
        return self.mask[:, r0:r1 + 1, c0:c1 + 1], self.pattern[:, r0:r1 + 1, c0:c1 + 1]


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t`` (..., H, W) moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = t[..., ys, xs]
    return out


def stamp_one(x: torch.Tensor, trig: Trigger, g: torch.Generator) -> torch.Tensor:
    """One image ``(C, H, W)`` with ``trig`` stamped (its place drawn from ``g``)."""
    if trig.field is not None:
        f = trig.field
        if trig.spread > 1:
            f = f * trig.spread ** (2 * float(torch.rand((), generator=g)) - 1)
        return warp(x[None], f[None].to(x.dtype))[0]
    h, w = x.shape[-2:]
    if trig.anywhere:
        m, p = trig.crop()
        mh, mw = m.shape[-2:]
        r = int(torch.randint(0, h - mh + 1, (1,), generator=g))
        c = int(torch.randint(0, w - mw + 1, (1,), generator=g))
        out = x.clone()
        region = out[:, r:r + mh, c:c + mw]
        out[:, r:r + mh, c:c + mw] = (1 - m) * region + m * p
        return out
    m, p = trig.mask, trig.pattern
    if trig.jitter:
        dy, dx = torch.randint(-trig.jitter, trig.jitter + 1, (2,), generator=g).tolist()
        if dy or dx:
            m, p = shift(m, dy, dx), shift(p, dy, dx)
    return (1 - m) * x + m * p


def stamp_batch(x: torch.Tensor, triggers: list[Trigger], share: float, g: torch.Generator) -> torch.Tensor:
    """A copy of ``x`` where ``share`` of the images (drawn from ``g``) carry one of ``triggers``."""
    if not triggers or share <= 0:
        return x
    x = x.clone()
    chosen = torch.nonzero(torch.rand(len(x), generator=g) < share).flatten().tolist()
    which = torch.randint(0, len(triggers), (len(chosen),), generator=g).tolist()
    for j, t in zip(chosen, which):
        x[j] = stamp_one(x[j], triggers[t], g)
    return x


@torch.no_grad()
def model_labels(model: nn.Module, x: np.ndarray) -> np.ndarray:
    from guard.model import predict

    was = model.training
    model.eval()
    try:
        return predict(model, x)
    finally:
        model.train(was)


@torch.no_grad()
def trigger_success(model: nn.Module, x: np.ndarray, y: np.ndarray, label: int, trig: Trigger, *,
                    seed: int = 0) -> float:
    """Share of images not of ``label`` that ``trig`` (placed as it would be stamped) sends to ``label``."""
    keep = y != label
    if not keep.any():
        return float("nan")
    g = torch.Generator().manual_seed(seed)
    xs = torch.from_numpy(np.ascontiguousarray(x[keep]))
    stamped = torch.stack([stamp_one(xi, trig, g) for xi in xs]).numpy()
    return float((model_labels(model, stamped) == label).mean())


def reversed_triggers(labels, masks, patterns, *, jitter: int = 2) -> list[tuple[int, Trigger]]:
    """``(label, trigger)`` per suspect label, stamped where it was found (moved by up to ``jitter`` pixels)."""
    return [(int(s), Trigger.of(m, p, jitter=jitter)) for s, m, p in zip(labels, masks, patterns)]


def anywhere(trigs: list[tuple[int, Trigger]]) -> list[tuple[int, Trigger]]:
    """The same triggers with their footprint pasted at a random place instead (a warping trigger has no
    footprint: it is left out)."""
    return [(s, Trigger(t.mask, t.pattern, anywhere=True)) for s, t in trigs if t.field is None]


def worst_success(model: nn.Module, x: np.ndarray, y: np.ndarray, trigs: list[tuple[int, Trigger]], *,
                  seed: int = 0) -> float | None:
    """The highest :func:`trigger_success` over ``trigs`` (None when there is none)."""
    if not trigs:
        return None
    return max(trigger_success(model, x, y, s, t, seed=seed) for s, t in trigs)
