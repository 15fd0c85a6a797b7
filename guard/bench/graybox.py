"""Gray-box attacker: re-optimise the trigger to look like clean target-class images at every layer.

The attacker trained the backdoored model, so it has the weights; it has its own images (a draw
disjoint from the defender's) and guard's documentation, which says that the online checks compare
an input's activations with clean statistics of the class the model predicts. It has neither the
defender's clean images nor the deployed profile, so it cannot copy the guard's statistic (the
white-box attacker, :mod:`guard.bench.whitebox`, can). What it can do is make the triggered inputs'
activations match its own clean target-class images' at *every* layer it can hook.

:class:`~guard.scan.moments.LayerStatistics` hooks every leaf module of the model (convolutions, normalisations,
activations, pooling) and the classifier's input, and pools each output per channel: the spatial
mean of each channel (the mean over tokens for a token layer), and for feature maps also each
channel's spatial standard deviation. On the attacker's clean target-class images it records, per
layer and channel, the mean and the spread (standard deviation over images) of both.

:func:`attack_model` optimises the trigger (:class:`~guard.bench.trigger_param.OptimisedTrigger`: the patch
inside its footprint, the blend key at the attack's opacity, the warp field at its strength) with
Adam on batches of the attacker's images of other classes: cross-entropy to the target plus
``weight`` times the moment-matching loss relative to the attack's own trigger's (so one weight means
the same trade on a patch whose activations are far off the clean ones and on a faint blend), averaged
over layers: per channel, the squared
standardised difference of the batch's mean from the clean mean, the squared log ratio of the
batch's spread to the clean spread, and the same two terms for the spatial standard deviations.
Each budget (steps, weight) starts from the attack's own trigger and is measured on the defender's
held-out images with the real guard: bare attack success and the residual (reaches the target and
passes).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.stream import fresh_noise_rows, memory_figures
from guard.bench.trigger_param import (
    OptimisedTrigger,
    as_tensor,
    relative_loss,
    residual_similarity,
    seeded_trigger,
    through_guard,
)
from guard.demo.attacks import Attack
from guard.model import frozen
from guard.scan.moments import LayerStatistics, clean_moments, moment_loss


@dataclass(frozen=True)
class Budget:
    """One optimisation budget: Adam ``steps``, the ``weight`` of the moment-matching loss, the weight
    ``evade`` of the memory-evasion loss (:func:`~guard.bench.trigger_param.residual_similarity`; 0: the
    attacker ignores the memory) and the weight ``rank`` of the trajectory-evasion loss."""

    steps: int
    weight: float
    evade: float = 0.0
    rank: float = 0.0
    """Weight of the trajectory-evasion loss (:func:`rank_loss`, relative to the attack's own trigger's; 0: the
    attacker ignores the trajectory check)."""


DEFAULT_BUDGETS = (Budget(100, 1.0), Budget(300, 1.0), Budget(300, 10.0))


def own_grids(stats: LayerStatistics, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Per traced layer, ``x``'s outputs as the trajectory check pools them (no gradient)."""
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            stats.capture(x[i:i + batch])
            for k, v in stats.grids_.items():
                parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def rank_loss(grids: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], others: dict[str, torch.Tensor]
              ) -> torch.Tensor:
    """The trajectory check's rank as the attacker can estimate it with its own images: at each traced layer,
    by how much each input's nearest own image of another class is nearer than its nearest own image of the
    target class (a hinge on squared distances, 0 when the target class's is the nearer), relative to the
    layer's mean squared distance to the target images; the mean over layers and inputs."""
    terms = []
    for k, g in grids.items():
        dt = torch.cdist(g, targets[k]).pow(2)
        do = torch.cdist(g, others[k]).pow(2).min(1).values
        terms.append(torch.relu(dt.min(1).values - do).mean() / dt.detach().mean().clamp_min(1e-6))
    return torch.stack(terms).mean()


def attack_model(model: nn.Module, attack: Attack, guard, x_own: np.ndarray, y_own: np.ndarray, x_eval: np.ndarray, *,
                 budgets: tuple[Budget, ...] = DEFAULT_BUDGETS, lr: float = 0.05, batch_size: int = 32,
                 seed: int = 0, memory=None, traffic: tuple[np.ndarray, np.ndarray] | None = None,
                 keep_stamped: bool = False) -> dict[str, Any]:
    """Re-optimise ``attack``'s trigger on the attacker's own images ``(x_own, y_own)`` at every budget and
    measure it with ``guard`` (the defender's) on ``x_eval`` (held-out images of classes the attack changes).

    Only ``model`` is used to optimise; ``guard`` judges. Returns the attack's own trigger's figures
    (``baseline``), one row per budget with the matching loss before and after, and the layers matched.
    ``model`` keeps its weights, gradient flags and mode.

    With ``memory`` (a calibrated :class:`~guard.online.memory.TriggerMemory`) and ``traffic`` (clean history,
    clean test images) each row also gives the figures of the same guard with the memory on
    (``..._with_memory``), the triggered inputs arriving among the clean ones (:mod:`guard.bench.stream`),
    and ``fresh_noise`` the strongest budget's trigger with fresh noise on every query
    (:data:`~guard.bench.stream.FRESH_NOISE`), the attacker's answer to the memory.

    ``keep_stamped`` adds ``stamped``: ``x_eval`` stamped with each budget's trigger, in budget order (arrays,
    not JSON: the caller takes them out), so that the same triggered inputs can be judged by another guard.
    """
    shape = tuple(int(s) for s in x_eval.shape[1:])
    target = int(attack.target)
    own_target = np.asarray(y_own) == target
    if own_target.sum() < 2 or (~own_target).sum() < 2:
        raise ValueError("the gray-box attacker needs its own images of the target class and of other classes")
    base = OptimisedTrigger(attack, shape)
    stamp = lambda xt: as_tensor(attack.stamp(xt.numpy()))  # noqa: E731
    baseline, _ = through_guard(guard, stamp, x_eval, target)
    with_memory = memory_figures(guard, memory, traffic)
    baseline |= with_memory(stamp, x_eval, target)
    out: dict[str, Any] = {"attack": type(attack).__name__, "trigger": base.kind, "n_own": int(len(x_own)),
                           "n_eval": int(len(x_eval)), "lr": lr, "batch_size": batch_size,
                           "baseline": baseline, "budgets": []}
    xo = as_tensor(x_own)
    x_victims, x_target = xo[torch.from_numpy(~own_target)], xo[torch.from_numpy(own_target)]
    yt = torch.full((batch_size,), target, dtype=torch.long)
    ranked = any(b.rank for b in budgets)
    stats = LayerStatistics(model, shape, grids=ranked)
    trained = []
    with frozen(model), stats.hooked():
        moments = clean_moments(stats, x_target)
        out["layers_matched"] = len(moments)
        if ranked:  # the attacker's own references: its target-class images and a draw of the others
            pick = torch.randperm(len(x_victims), generator=torch.Generator().manual_seed(seed))[:300]
            targets, others = own_grids(stats, x_target), own_grids(stats, x_victims[pick])
        for b in budgets:
            t0 = time.perf_counter()
            trig, opt, gen = seeded_trigger(attack, shape, seed=seed, lr=lr)
            losses: list[float] = []
            repeats: list[float] = []
            ranks: list[float] = []
            for _ in range(int(b.steps)):
                pick = torch.randint(0, len(x_victims), (min(batch_size, len(x_victims)),), generator=gen)
                stamped = trig(x_victims[pick])
                logits, pooled = stats.capture(stamped)
                match = moment_loss(pooled, moments)
                scale = losses[0] if losses else float(match.detach())  # the attack's own trigger's mismatch
                loss = nn.functional.cross_entropy(logits, yt[:len(pick)]) + b.weight * match / max(scale, 1e-6)
                if b.evade:  # relative to the attack's own trigger's, as the matching loss
                    loss = loss + relative_loss(residual_similarity(stamped), repeats, b.evade)
                if b.rank:
                    loss = loss + relative_loss(rank_loss(stats.grids_, targets, others), ranks, b.rank)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(match.detach()))
            trained.append((b, trig, losses, repeats, ranks, time.perf_counter() - t0))
    kept = []
    for b, trig, losses, repeats, ranks, seconds in trained:  # judged by the real guard, with the attacker's hooks gone
        figures, _ = through_guard(guard, trig, x_eval, target)
        if keep_stamped:
            with torch.no_grad():
                kept.append(trig(as_tensor(x_eval)).clamp(0, 1).numpy())
        figures |= with_memory(trig, x_eval, target)
        out["budgets"].append(asdict(b) | figures | {
            "matching_loss_first": round(losses[0], 4) if losses else None,
            "matching_loss_last": round(losses[-1], 4) if losses else None,
            "residual_similarity_first": round(repeats[0], 4) if repeats else None,
            "residual_similarity_last": round(repeats[-1], 4) if repeats else None,
            "rank_loss_first": round(ranks[0], 4) if ranks else None,
            "rank_loss_last": round(ranks[-1], 4) if ranks else None,
            "seconds": round(seconds, 2)})
    out["max_residual_attack_success"] = max((r["residual_attack_success"] for r in out["budgets"]), default=None)
    if keep_stamped:
        out["stamped"] = kept
    plain = [t for t in trained if not (t[0].evade or t[0].rank)]
    if memory is not None and plain:  # the strongest budget that ignores the memory, blurred
        b, trig = plain[-1][:2]
        out["fresh_noise"] = fresh_noise_rows(guard, trig, b, x_eval, target, with_memory, seed=seed)
    if memory is not None:
        out["max_residual_attack_success_with_memory"] = max(
            (r["residual_attack_success_with_memory"] for r in out["budgets"]), default=None)
    return out
