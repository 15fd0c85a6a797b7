"""The guard on a stream of traffic: triggered queries arriving among clean ones, as a deployment sees them.

The per-input figures (AUROC, TPR at 1% FPR) score every input alone; the trigger memory
(:mod:`guard.online.memory`) is a property of the stream, so it is measured here: the memory starts
holding clean history (``warm``), then the clean test images and the triggered ones arrive interleaved,
one triggered query in every ``1 / attack_share``, in arrival order. A triggered query counts as through
when the guard serves the target and does not reject it; the clean figure is the share of clean queries
rejected, by any check (``..._by_memory``: by the memory's similarity or energy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from guard.bench.trigger_param import as_tensor, through_guard

ATTACK_SHARE = 0.2
"""One triggered query in five: the rate at which the streams interleave them with clean traffic."""

FRESH_NOISE = (0.05, 0.1, 0.2)
"""Amplitudes of the uniform noise, drawn afresh for every query, that an adaptive attacker adds to its
strongest trigger to blur what its queries share (the trigger memory's evidence): each pixel moves by at
most this."""


def clean_traffic(x: np.ndarray, sources: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` of the clean images ``x`` after the last of those at ``sources`` (the indices of the images
    the triggered queries are stamped on), so that the traffic keeps the test set's class mix (the sources
    are the attack's victims, every class but the target). A triggered query whose own clean image passed
    through the memory shares that image's residual, evidence an attacker sending its own images never
    gives a deployment; and the clean image would match its triggered twin in turn, a false alarm no real
    stream has."""
    sources = np.asarray(sources, dtype=np.int64)
    return x[int(sources.max()) + 1 if len(sources) else 0:][:n]


def interleave(n_clean: int, n_triggered: int) -> np.ndarray:
    """``(n_clean + n_triggered,)`` arrival order: True for a triggered query, spread evenly (the first
    triggered query comes after the first gap of clean ones)."""
    order = np.zeros(n_clean + n_triggered, dtype=bool)
    if n_triggered:
        order[np.linspace(0, len(order), n_triggered, endpoint=False).astype(int) + len(order) // n_triggered - 1
              ] = True
    return order


def stream_figures(guard, triggered: np.ndarray, target: int | np.ndarray, clean: np.ndarray, warm: np.ndarray, *,
                   attack_share: float = ATTACK_SHARE, batch: int = 16) -> dict[str, Any]:
    """Run ``guard`` (with its trigger memory, if any) over ``clean`` with triggered inputs interleaved at
    ``attack_share`` (as many of ``triggered`` as that share of the stream allows), after ``warm`` clean
    history; ``triggered`` is already stamped, ``target`` its target label (one, or one per input). The memory,
    if any, is emptied first and after."""
    if not 0 < attack_share < 1:
        raise ValueError(f"attack_share must be in (0, 1), got {attack_share}")
    n_trig = min(len(triggered), max(1, round(len(clean) * attack_share / (1 - attack_share))))
    order = interleave(len(clean), n_trig)
    x = np.empty((len(order), *clean.shape[1:]), dtype=np.float32)
    x[order], x[~order] = triggered[:n_trig], clean
    memory = guard.memory
    if memory is not None:
        memory.reset()
        memory.update(warm[-memory.size:])
    served, rejected, by_memory = [], [], []
    try:
        for i in range(0, len(x), batch):
            r = guard.run(x[i:i + batch])
            served.append(r.logits.argmax(1))
            rejected.append(r.verdict_codes == 1)
            by_memory.append(r.over[:, -2:].any(1) if memory is not None else np.zeros(len(r.verdict_codes), bool))
    finally:
        if memory is not None:
            memory.reset()
    served_, rejected_, by_memory_ = np.concatenate(served), np.concatenate(rejected), np.concatenate(by_memory)
    t, c = order, ~order
    target = np.broadcast_to(np.asarray(target), (len(triggered),))[:n_trig]
    return {"attack_share": attack_share, "n_triggered": int(n_trig), "n_clean": int(c.sum()),
            "residual_attack_success": round(float(((served_[t] == target) & ~rejected_[t]).mean()), 4),
            "triggered_rejected_by_memory": round(float(by_memory_[t].mean()), 4),
            "clean_rejected": round(float(rejected_[c].mean()), 4),
            "clean_rejected_by_memory": round(float(by_memory_[c].mean()), 4)}


def memory_figures(guard, memory, traffic: tuple[np.ndarray, np.ndarray] | None
                   ) -> Callable[[Callable, np.ndarray, int], dict[str, Any]]:
    """A function giving the figures of ``guard`` with ``memory`` on a stream (the triggered inputs among
    ``traffic``'s clean test images, after its clean history; ``..._with_memory`` keys), or an empty dict
    without a memory. ``trigger`` maps a tensor batch of clean images to triggered ones."""
    if memory is None or traffic is None:
        return lambda trigger, x, target: {}
    from guard.online import Guard

    memory_guard = Guard(guard.model, guard.profile, mode=guard.mode, verify=False, memory=memory)
    warm, clean = traffic

    def figures(trigger, x, target) -> dict[str, Any]:
        with torch.no_grad():
            xt = trigger(as_tensor(x)).clamp(0, 1).numpy()
        f = stream_figures(memory_guard, xt, target, clean, warm)
        return {"residual_attack_success_with_memory": f["residual_attack_success"],
                "clean_rejected_with_memory": f["clean_rejected"]}
    return figures


def with_fresh_noise(trigger, amplitude: float, seed: int):
    """``trigger`` followed by uniform noise in ``[-amplitude, amplitude]`` drawn afresh on every call."""
    gen = torch.Generator().manual_seed(seed)

    def noisy(xt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            noise = (torch.rand(xt.shape, generator=gen) * 2 - 1) * amplitude
        return (trigger(xt) + noise).clamp(0, 1)
    return noisy


def fresh_noise_rows(guard, trigger, budget, x_eval: np.ndarray, target: int, with_memory, *, seed: int = 0
                     ) -> list[dict[str, Any]]:
    """``trigger`` (trained at ``budget``) with fresh noise on every query at each of :data:`FRESH_NOISE`:
    bare attack success and residual through ``guard``, and through it with the memory (``with_memory``,
    from :func:`memory_figures`)."""
    rows = []
    for amp in FRESH_NOISE:
        figures, _ = through_guard(guard, with_fresh_noise(trigger, amp, seed), x_eval, target)
        figures |= with_memory(with_fresh_noise(trigger, amp, seed), x_eval, target)
        rows.append({"amplitude": amp} | asdict(budget) | figures)
    return rows
