"""Warp reversal: Neural Cleanse's question asked of warping triggers.

A warping backdoor (WaNet, Nguyen and Tran, ICLR 2021) has no patch and no pattern: its trigger is a
fixed, smooth elastic warp of the image that moves edges by a fraction of a pixel, and the attacker
trains with randomly jittered warps at the true label (*noise mode*) so that only that warp works.
Neither a smallest region (Neural Cleanse) nor a faint full-image pattern (the blend reversal) stands
for it. This scan asks the warp question instead: for each label k and a grid of increasing
strengths s (the largest displacement, in pixels, of a field of ``grid`` x ``grid`` control points,
upsampled bicubically to the image), it optimises one smooth displacement field per label (tanh
bound, Adam, every label in one batched problem; each strength starts from the previous one's
fields) so that the warped image is classified k, and measures the success on held-out clean images
of the other classes. From that curve it reads the strength each label needs for half of them. On a
clean model every label needs a large warp (a digit has to be bent into another); the target of a
warping backdoor is reached with a fraction of the others' strength. A label's *lead* is the share
of strength it saves over the easiest other label, as in :mod:`guard.scan.blend`
(:mod:`guard.scan.reversal`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guard._progress import Progress
from guard.model import frozen
from guard.scan.reversal import crossing, leads, reversal_data


def warp(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Resample images ``x`` ``(N, C, H, W)`` displaced by ``field`` ``(N, 2, H, W)`` in pixels (x, y),
    bilinear, edges repeated (so moving the border adds no dark frame that could pass for a patch)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], dtype=x.dtype).view(1, 2, 1, 1)
    grid = torch.stack([gx, gy])[None] + field * scale
    return F.grid_sample(x, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border", align_corners=True)


def smooth_field(raw: torch.Tensor, strength: float, size: tuple[int, int]) -> torch.Tensor:
    """``(K, 2, H, W)`` displacements in pixels: control points ``raw`` ``(K, 2, g, g)`` bounded to
    ``strength`` by tanh, upsampled bicubically (the way WaNet builds its field) and clipped to
    ``strength`` again (bicubic overshoots its control points by up to half), so that a strength is the
    largest displacement anywhere."""
    up = F.interpolate(strength * torch.tanh(raw), size=size, mode="bicubic", align_corners=True)
    return up.clamp(-strength, strength)


class WarpReversal:
    """Reverse-engineer a smooth warp per label at fixed strengths and flag a label that leads.

    Parameters
    ----------
    strengths
        The strength grid the success curve is read on: the largest displacement anywhere,
        in pixels (increasing, each > 0); 0.25 to 3. A label that needs more than the last is censored
        there.
    grid
        Control points per side of the displacement field; 4, WaNet's reference value. A finer grid
        lets natural labels bend digits more cheaply, a coarser one cannot express a local warp.
    steps
        Adam steps at the first strength; 60.
    refine_steps
        Adam steps at each later strength, which starts from the previous one's fields; 20.
    batch_size
        Images each label's field warps per step; 16.
    lr
        Adam's learning rate on the raw (tanh) control points; 0.1.
    n_fit
        Clean images the fields are optimised on, at most (and at most a third of ``x``); 100.
    n_eval
        Held-out clean images the success is measured on, at most; 300.
    success
        Share of the held-out images of other classes a label must reach; its needed strength is where
        its success first crosses this; 0.5.
    threshold
        A label whose lead is over this is suspect; 0.5, between the largest lead of a label on the clean
        and non-warping models it was read from and the warped models' targets (docs/benchmarks.md,
        'Measurements behind the defaults').
    seed
        Seeds the fit/held-out split, the batches and thus the fields.
    progress
        Progress bar on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).

    Learned attributes: ``attack_success_`` (S, K) success of each label's field at each strength,
    ``strength_needed_`` (K,) the strength each label needs for ``success`` of it (censored at the
    last), ``lead_`` (K,) the share of strength it saves over the easiest other label, ``fields_``
    (K, 2, H, W) each label's displacement field (pixels) at the grid strength nearest its need,
    ``suspect_labels_``, ``steps_``, ``seconds_``.
    """

    def __init__(self, *, strengths: Sequence[float] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0), grid: int = 4,
                 steps: int = 60, refine_steps: int = 20, batch_size: int = 16, lr: float = 0.1,
                 n_fit: int = 100, n_eval: int = 300, success: float = 0.5, threshold: float = 0.5,
                 seed: int = 0, progress: bool | None = None):
        self.strengths = strengths
        self.grid = grid
        self.steps = steps
        self.refine_steps = refine_steps
        self.batch_size = batch_size
        self.lr = lr
        self.n_fit = n_fit
        self.n_eval = n_eval
        self.success = success
        self.threshold = threshold
        self.seed = seed
        self.progress = progress

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray | None = None,
            num_classes: int | None = None) -> WarpReversal:
        """Optimise every label's field at every strength on clean ``x`` (N, C, H, W) in [0, 1].

        ``y`` (the clean labels) decides which held-out images count for a label's success (those of
        other classes); without it the model's own predictions do.
        """
        t0 = time.perf_counter()
        strengths = [float(s) for s in self.strengths]
        if not strengths or any(s <= 0 for s in strengths) or strengths != sorted(set(strengths)):
            raise ValueError(f"strengths must be increasing and positive, got {self.strengths!r}")
        if int(self.grid) < 2:
            raise ValueError(f"grid must be at least 2 control points per side, got {self.grid!r}")
        fit_x, eval_x, eval_y, k = reversal_data(model, x, y, n_fit=self.n_fit, n_eval=self.n_eval, seed=self.seed,
                                                 num_classes=num_classes)
        gen = torch.Generator().manual_seed(self.seed)
        size = tuple(x.shape[2:])
        steps = self.steps + (len(strengths) - 1) * self.refine_steps
        with frozen(model), Progress("warp", steps, enabled=self.progress) as bar:
            target = torch.arange(k).repeat_interleave(self.batch_size)
            success = np.zeros((len(strengths), k))
            fields = np.zeros((len(strengths), k, 2, *size), dtype=np.float32)
            g = int(self.grid)
            raw = (0.01 * torch.randn((k, 2, g, g), generator=gen)).requires_grad_(True)
            opt = torch.optim.Adam([raw], lr=self.lr)
            for s_i, s in enumerate(strengths):
                for _ in range(self.steps if s_i == 0 else self.refine_steps):
                    batch = fit_x[torch.randint(0, len(fit_x), (self.batch_size,), generator=gen)]
                    field = smooth_field(raw, s, size).repeat_interleave(self.batch_size, 0)
                    warped = warp(batch.repeat(k, 1, 1, 1), field)
                    loss = nn.functional.cross_entropy(model(warped), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                with torch.no_grad():
                    field = smooth_field(raw, s, size)
                    fields[s_i] = field.numpy()
                    for label in range(k):
                        others = eval_y != label
                        if not others.any():
                            continue
                        xo = eval_x[others]
                        pred = model(warp(xo, field[label:label + 1].expand(len(xo), -1, -1, -1))).argmax(1)
                        success[s_i, label] = float((pred == label).float().mean())
        self.attack_success_ = success
        self.strength_needed_ = crossing(np.asarray(strengths), success, self.success)
        nearest = np.abs(np.asarray(strengths)[:, None] - self.strength_needed_[None]).argmin(0)
        self.fields_ = fields[nearest, np.arange(k)]
        self.lead_ = leads(self.strength_needed_)
        self.suspect_labels_ = [int(j) for j in np.flatnonzero(self.lead_ > self.threshold)]
        self.steps_ = steps
        self.seconds_ = time.perf_counter() - t0
        return self

    def per_label(self) -> list[dict]:
        """One JSON-ready record per label."""
        return [{"label": j, "lead": round(float(self.lead_[j]), 4),
                 "strength": round(float(self.strength_needed_[j]), 4),
                 "attack_success": {f"{s:g}": round(float(self.attack_success_[i, j]), 4)
                                    for i, s in enumerate(self.strengths)},
                 "suspect": j in self.suspect_labels_} for j in range(len(self.lead_))]

    def to_profile(self) -> tuple[dict[str, Any], np.ndarray]:
        """What a profile keeps of the fit (:meth:`guard.profile.Profile.set_warp`): the result's fields and
        the reversed fields ``(k, 2, H, W)``, so that an audit of the same model can reuse them."""
        return ({"threshold": float(self.threshold), "suspect_labels": list(self.suspect_labels_),
                 "per_label": self.per_label(), "strengths": [float(v) for v in self.strengths],
                 "grid": int(self.grid), "success": float(self.success), "seed": int(self.seed),
                 "steps": int(self.steps_), "seconds": round(float(self.seconds_), 2)}, self.fields_)
