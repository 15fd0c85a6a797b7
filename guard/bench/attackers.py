"""The adaptive attackers in a run: the white-box attacker against a row's guard, the gray-box attacker
against its model (with and without the trigger memory) and the gray-box floor on the clean model."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from guard.bench.config import BenchConfig, bench_data, log
from guard.demo.attacks import Attack
from guard.demo.glyphs import glyphs
from guard.online import Guard
from guard.online.memory import TriggerMemory


def memory_watches(profile) -> str | list[int] | None:
    """What the profile's trigger memory watches: its labels, ``"all"``, or None (no memory)."""
    if profile.memory is None:
        return None
    return "all" if profile.memory.get("labels") is None else list(profile.memory["labels"])


def whitebox_row(cfg: BenchConfig, model: nn.Module, attack: Attack, guard: Guard, d, n_eval: int, x_fit: np.ndarray,
              y_fit: np.ndarray, x_cal: np.ndarray | None = None) -> dict[str, Any]:
    """The white-box attacker against this row's guard: it optimises on test images past the evaluation
    ones (the scan's clean half where too few are left) and is measured on the row's triggered inputs,
    without and (given the defender's clean ``x_cal`` as history) with the profile's trigger memory."""
    from guard.bench.whitebox import bench_row

    own = attack.victims(d.y_test[n_eval:])
    x_att = d.x_test[n_eval:][own] if own.sum() >= 32 else x_fit[attack.victims(y_fit)]
    x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
    memory = TriggerMemory.from_profile(guard.profile) if x_cal is not None else None
    return bench_row(model, attack, guard, x_att[:500], x_eval, budgets=cfg.whitebox_budgets, seed=cfg.zoo.seed,
                     memory=memory, traffic=None if memory is None else (x_cal, stream_clean(d, attack, n_eval)))


def stream_clean(d, attack: Attack, n_eval: int) -> np.ndarray:
    """The clean test images a row's streams interleave its triggered ones with: up to ``n_eval`` of those after
    the last one the triggered inputs (the first ``n_eval`` of the attack's victims) are stamped on
    (:func:`~guard.bench.stream.clean_traffic`)."""
    from guard.bench.stream import clean_traffic

    return clean_traffic(d.x_test, np.flatnonzero(attack.victims(d.y_test))[:n_eval], n_eval)


def regraftable(attack: Attack | None, shape: tuple[int, int, int]) -> bool:
    """Whether the adaptive attackers can re-optimise ``attack``'s trigger (a patch, a blend key, a warp)."""
    from guard.bench.trigger_param import trigger_kind

    if attack is None or getattr(attack, "target", -1) < 0:
        return False
    try:
        trigger_kind(attack, shape)
    except ValueError:
        return False
    return True


def attacker_images(cfg: BenchConfig) -> tuple[np.ndarray, np.ndarray]:
    """The gray-box attacker's own images: a glyph draw disjoint from the zoo's and the defender's seeds."""
    return glyphs(cfg.graybox_images, seed=cfg.zoo.seed * 10 + 7)


def graybox_row(cfg: BenchConfig, model: nn.Module, attack: Attack, guard: Guard, d, n_eval: int,
             x_cal: np.ndarray, *, keep_stamped: bool = False) -> dict[str, Any]:
    """The gray-box attacker against this row's model, judged by this row's guard on its triggered inputs,
    without and with the profile's trigger memory (what ``guard scan`` ships by default), which sees the
    triggered inputs among the row's clean test images after the defender's clean ``x_cal`` as history
    (:mod:`guard.bench.stream`). ``keep_stamped``: the row also holds ``stamped``, each budget's triggered
    inputs (for :func:`after_purification`; not JSON)."""
    from guard.bench.graybox import Budget, attack_model

    x_own, y_own = attacker_images(cfg)
    x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
    memory = TriggerMemory.from_profile(guard.profile)
    out = attack_model(model, attack, guard, x_own, y_own, x_eval, seed=cfg.zoo.seed,
                       budgets=tuple(Budget(int(b[0]), *map(float, b[1:])) for b in cfg.graybox_budgets),
                       memory=memory, traffic=(x_cal, stream_clean(d, attack, n_eval)), keep_stamped=keep_stamped)
    return out | {"memory_watches": memory_watches(guard.profile),
                  "memory_size": None if memory is None else memory.size}


def after_purification(purified: nn.Module, profile, target: int, budgets: list[dict[str, Any]],
                       stamped: list[np.ndarray], *, history: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """The gray-box keys against the model that purification made of the attacked one, guarded by a fresh
    scan of it (``profile``, its memory kept on the labels the attacked model's evidence named): what a user
    who follows the advice for a suspected model (``guard purify``, then the ``guard scan --watch`` it prints,
    and serve that) deploys. The keys were optimised on the weights the
    attacker trained; the purified weights come from the defender's clean images and the attacker never
    had them. ``budgets`` are the gray-box row's budget rows and ``stamped`` their triggered inputs (same
    order); each gets its bare attack success on the purified model, the share through its guard's
    per-input checks, and through the default guard (with the fresh profile's trigger memory, if it has
    one) on the stream of ``clean`` test images after ``history`` (:mod:`guard.bench.stream`)."""
    from guard.bench.stream import stream_figures
    from guard.bench.trigger_param import through_guard

    checks = Guard(purified, profile, mode="enforce", verify=False, memory=False)
    default = Guard(purified, profile, mode="enforce", verify=False)
    rows = []
    for b, xt in zip(budgets, stamped):
        figures, _ = through_guard(checks, lambda t: t, xt, target)
        row = {k: b[k] for k in ("steps", "weight", "evade", "rank")} | {
            "attack_success_bare": figures["attack_success_bare"],
            "residual_attack_success": figures["residual_attack_success"],
            "rejection_rate": figures["rejection_rate"]}
        if default.memory is not None:
            f = stream_figures(default, xt, target, clean, history)
            row |= {"residual_attack_success_with_memory": f["residual_attack_success"],
                    "clean_rejected_with_memory": f["clean_rejected"]}
        rows.append(row)
    out: dict[str, Any] = {"suspect_labels": [int(s) for s in profile.suspect_labels],
                           "memory_watches": memory_watches(profile), "budgets": rows,
                           "max_residual_attack_success": max((r["residual_attack_success"] for r in rows),
                                                              default=None)}
    if default.memory is not None:
        out["max_residual_attack_success_with_memory"] = max(
            (r["residual_attack_success_with_memory"] for r in rows), default=None)
    return out


def worst_after_purification(section: dict[str, Any]) -> float:
    """The figure the after-purification bar judges: the worst budget through the purified model's default
    guard (with its trigger memory where the fresh scan added one, else through its checks)."""
    return section.get("max_residual_attack_success_with_memory", section["max_residual_attack_success"])


def graybox_floors(cfg: BenchConfig, model: nn.Module, profile, progress) -> dict[str, Any] | None:
    """The gray-box attacker's strongest budget against the *clean* model guarded by its own profile, per
    attack: how often the re-optimised trigger hijacks a model that has no backdoor and passes its guard.

    A blend key or a warp field optimised at the attack's own strength is a universal adversarial
    perturbation as much as a trigger; this is the part of a row's residual that no backdoor is needed
    for, the floor to read that residual against."""
    if not cfg.graybox_budgets:
        return None
    from guard.bench.graybox import Budget, attack_model
    from guard.demo.attacks import ATTACKS

    d, _, _ = bench_data(cfg)
    n_eval = min(cfg.n_eval, len(d.x_test))
    guard = Guard(model, profile, mode="enforce", verify=False, memory=False)
    plain = [b for b in cfg.graybox_budgets if not any(b[2:])] or list(cfg.graybox_budgets)
    steps, weight = max((b[0], b[1]) for b in plain)
    strongest = Budget(int(steps), float(weight))
    out: dict[str, Any] = {"budget": {"steps": strongest.steps, "weight": strongest.weight}, "attacks": {}}
    for name in cfg.attacks:
        attack = ATTACKS[name](seed=cfg.zoo.seed)
        if not regraftable(attack, tuple(d.x_test.shape[1:])):
            continue
        log(progress, f"gray-box floor: {name} against the clean {cfg.zoo.net}")
        x_own, y_own = attacker_images(cfg)
        x_eval = d.x_test[attack.victims(d.y_test)][:n_eval]
        r = attack_model(model, attack, guard, x_own, y_own, x_eval, budgets=(strongest,), seed=cfg.zoo.seed)
        b = r["budgets"][0]
        out["attacks"][name] = {k: b[k] for k in ("attack_success_bare", "residual_attack_success", "rejection_rate")}
    return out
