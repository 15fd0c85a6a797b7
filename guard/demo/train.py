"""Seeded training and evaluation of small classifiers (demo worlds, tests, benchmarks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guard.model import predict


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and return a dedicated generator for data order."""
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _random_patches(xb: torch.Tensor, share: float, g: torch.Generator) -> torch.Tensor:
    """Paste a random-noise patch (2 to 5 pixels square, anywhere) on ``share`` of the batch.

    Models trained this way do not flip their label for a few arbitrary pixels, so a class change
    takes a large perturbation and a real trigger stands out as the only cheap one (the condition
    under which trigger reverse-engineering separates a backdoor, see docs/design.md).
    """
    n, c, h, w = xb.shape
    chosen = torch.nonzero(torch.rand(n, generator=g) < share).flatten().tolist()
    if not chosen:
        return xb
    xb = xb.clone()
    for i in chosen:
        s = int(torch.randint(2, 6, (1,), generator=g))
        r = int(torch.randint(0, h - s + 1, (1,), generator=g))
        q = int(torch.randint(0, w - s + 1, (1,), generator=g))
        xb[i, :, r:r + s, q:q + s] = (torch.rand((c, s, s), generator=g) > 0.5).float()
    return xb


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 6, batch_size: int = 64,
          lr: float = 2e-3, seed: int = 0, weight_decay: float = 0.0, patch_augment: float = 0.0) -> nn.Module:
    """Train ``model`` in place with Adam on (x, y); returns it in eval mode.

    ``patch_augment`` is the share of each batch that gets a random-noise patch (label unchanged).
    """
    g = seed_everything(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            xb = xt[idx]
            if patch_augment > 0:
                xb = _random_patches(xb, patch_augment, g)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def attack_success(model: nn.Module, attack, x: np.ndarray, y: np.ndarray) -> float:
    """Share of non-target inputs that the stamped trigger sends to the attacker's label."""
    keep = attack.victims(y)
    pred = predict(model, attack.stamp(x[keep]))
    return float((pred == attack.target_of(y[keep])).mean())
