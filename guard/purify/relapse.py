"""How deep a purification went: the reversed triggers' success after a short poisoned re-tuning.

A purification can bring a backdoor's attack success low and leave the backdoor's features in place; a
short fine-tuning with a few poisoned images then brings it back (PAM, NeurIPS 2024: the repair was
superficial). The bench measures that with the attacker's trigger (``comeback``); a defender has only the
reversed triggers. :func:`relapse` asks the same question with them: a copy of the model is fine-tuned for
one epoch on the learning images with a share ``rate`` of them stamped with a reversed trigger and
labelled with its suspect label, and the reversed triggers' success on the held-out images is measured
after. ``guard purify`` reports it for the original and the purified model side by side: a purified model
that relapses as far as the original one was repaired on the surface (figures: docs/benchmarks.md,
Purification).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from guard.purify.triggers import Trigger, stamp_one, worst_success
from guard.purify.tuning import finetune_epochs

SHALLOW = 0.3
"""A purified model whose reversed triggers come back to at least this success after the re-tuning gets a
note that its repair may be shallow. On the purification worlds of ``python -m guard.bench.purification``
(DemoNet with BadNets and with Blended, GapNet with BadNets; 20 images per class, 14 purified models;
docs/benchmarks.md, Purification) the purified models at or over it relapsed to 36-100%
and the attacker's real trigger, re-tuned the same way, succeeded 53-100% after the epoch; those under it
relapsed to 5-23% and the real trigger 9-50%. Chosen on those rows, not on held-out ones. On the ResNet-18
layout the reversed triggers relapse far less than the real one comes back (0-19% against 24-92% on its
shallow repairs), so there the note stays quiet on repairs that are not deep."""


def shallow_note(before: float | None, after: float | None) -> str | None:
    """What ``guard purify`` says when the purified model's relapse ``after`` is at least :data:`SHALLOW`
    (``before``: the original model's after the same re-tuning); None otherwise."""
    if after is None or after < SHALLOW:
        return None
    was = "" if before is None else f" (the original model: {100 * before:.0f}%)"
    return (f"one epoch of re-tuning with 1% of the images stamped with the reversed trigger brings it back to "
            f"{100 * after:.0f}%{was}: the repair may be shallow, and a backdoor that returns this fast can return "
            f"in later fine-tuning; another --method or more clean images may go deeper")


def poisoned_copy(x: np.ndarray, y: np.ndarray, trigs: list[tuple[int, Trigger]], *, rate: float,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` with ``rate`` of the images (at least one per trigger, seeded, none already of the trigger's
    label) stamped with a trigger of ``trigs`` in turn and relabelled with its label."""
    xp, yp = x.copy(), y.copy()
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n = max(len(trigs), int(round(rate * len(x))))
    taken: set[int] = set()
    for i in range(n):
        label, trig = trigs[i % len(trigs)]
        free = np.setdiff1d(np.flatnonzero(y != label), np.fromiter(taken, int, len(taken)))
        if len(free) == 0:
            continue
        j = int(rng.choice(free))
        taken.add(j)
        xp[j] = stamp_one(torch.from_numpy(np.ascontiguousarray(x[j])), trig, g).numpy()
        yp[j] = label
    return xp, yp


def retuned(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, lr: float = 1e-3, seed: int = 0,
            after_step: Callable[[nn.Module], None] | None = None, label: str = "retune") -> nn.Module:
    """A copy of ``model`` fine-tuned on ``(x, y)`` for ``epochs`` (Adam at ``lr``, train mode: batch statistics
    move, as in a user's later fine-tuning), in eval mode; ``after_step`` as :func:`finetune_epochs` takes it.
    The one re-tuning both :func:`relapse` and the bench's comeback rows run, so the two read the same epoch."""
    m = copy.deepcopy(model)
    for _ in finetune_epochs(m, x, y, epochs=epochs, lr=lr, seed=seed, frozen_stats=False, after_step=after_step,
                             label=label, progress=False):
        pass
    return m.eval()


def relapse(model: nn.Module, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            trigs: list[tuple[int, Trigger]], *, rate: float = 0.01, epochs: int = 1, lr: float = 1e-3,
            seed: int = 0) -> float | None:
    """The highest success of ``trigs`` on ``(x_val, y_val)`` after fine-tuning a copy of ``model`` for
    ``epochs`` on ``(x, y)`` with ``rate`` of it poisoned by ``trigs`` (:func:`poisoned_copy`; Adam at
    ``lr``, train mode, as the bench's ``comeback`` re-tunes with the attacker's trigger). ``model`` is not
    changed. None when there is no trigger."""
    if not trigs:
        return None
    xp, yp = poisoned_copy(x, y, trigs, rate=rate, seed=seed)
    m = retuned(model, xp, yp, epochs=epochs, lr=lr, seed=seed, label="relapse")
    return worst_success(m, x_val, y_val, trigs, seed=seed)
