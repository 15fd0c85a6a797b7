"""White-box test-time attacker: optimise the trigger against the deployed guard itself.

The attacker knows the backdoored model, its own attack and the guard's deployed profile (every
check's fitted state and the ensemble's calibration). :class:`Surrogate` re-implements, in torch and
from that fitted state, each check's score (:mod:`guard.online.checks`) and the ensemble's statistic
(:mod:`guard.online.ensemble`), so that the statistic has a gradient with respect to the input:

* ``feature``: squared whitened distance to the predicted class's centre (exact);
* ``knn`` and ``inner_knn``: one minus the ``k``-th largest cosine similarity to the predicted class's
  bank of feature rows, or of the inner layer's pooled rows (exact; the gradient flows through the
  ``k``-th neighbour);
* ``consistency``: the discriminant's distance of the predicted class over the best class, on the
  inner layer's pooled (mean, max) activations (exact; max and min give subgradients);
* ``neuron``: the largest standardised suspect-neuron activation (exact);
* ``overlap``: the largest absolute standardised match with a reversed pattern inside its mask (exact);
* ``token``: each block's token statistic (computed by the tap, differentiable) over its clean scale, the
  largest (exact);
* Fisher's ensemble: each check's ``-log`` clean tail probability. Inside the calibration sample the
  real rule counts calibration scores at least as high (a step function, no gradient); the surrogate
  counts with a sigmoid of width ``tau`` (a share of the check's clean score spread) instead. Past the
  sample's top the real rule's fitted exponential tail is linear already and is used as is.

The predicted label the checks condition on is the model's argmax, as in the guard. A check the
surrogate does not know (a check added later) is left out of it and named under
``not_in_surrogate``; it still judges, since every figure of success is measured with the real
:class:`~guard.online.Guard` in enforce mode.

:func:`attack_guard` optimises with Adam the attack's own trigger at its own strength
(:class:`~guard.bench.trigger_param.OptimisedTrigger`: a patch inside its footprint, a blend key at the
attack's opacity, a warp field at its strength). The loss
is the cross-entropy to the target label plus ``weight`` times the surrogate statistic over the
ensemble's threshold, on a batch of the attacker's own clean images of other classes than the target.
Each budget (steps, weight) reports on held-out triggered inputs: the bare attack success of the
optimised trigger, the residual attack success through the guard (target label served *and* passed
in enforce mode), the guard's rejection rate and the surrogate's and the real statistic's means.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.stream import fresh_noise_rows, memory_figures
from guard.bench.trigger_param import as_tensor as _t
from guard.bench.trigger_param import relative_loss, residual_similarity, seeded_trigger, through_guard
from guard.demo.attacks import Attack
from guard.model import FeatureTap, feature_layer, pool_features
from guard.online import Guard


@dataclass(frozen=True)
class Budget:
    """One optimisation budget: Adam ``steps``, the ``weight`` of the surrogate statistic in the loss and the
    weight ``evade`` of the memory-evasion loss (:func:`~guard.bench.trigger_param.residual_similarity`,
    relative to the attack's own trigger's; 0: the attacker ignores the memory)."""

    steps: int
    weight: float
    evade: float = 0.0


DEFAULT_BUDGETS = (Budget(50, 0.3), Budget(150, 1.0), Budget(300, 3.0))


def _feature(p: tuple) -> Callable:
    whiten, centres = _t(p[0]), _t(p[1])

    def score(x, pred, f, g):
        d = f @ whiten - centres[pred]
        return (d * d).sum(1)
    return score


def _knn(p: tuple, inner: bool = False) -> Callable:
    bank, starts, stops, k = _t(p[0]), np.asarray(p[1]), np.asarray(p[2]), int(p[3])
    rows = torch.arange(len(bank))
    member = torch.stack([(rows >= int(a)) & (rows < int(b)) for a, b in zip(starts, stops)])  # (K, M)
    reach = torch.from_numpy(np.minimum(k, stops - starts).astype(np.int64)) - 1  # a class under k rows: its farthest

    def score(x, pred, f, g):
        v = g if inner else f
        sim = v @ bank.T  # (N, M): cosine similarity times |v|
        sim = sim.masked_fill(~member[pred], float("-inf"))
        kth = sim.topk(k, dim=1).values.gather(1, reach[pred][:, None])[:, 0]
        return 1.0 - kth / v.norm(dim=1).clamp_min(1e-12)
    return score


def _consistency(p: tuple) -> Callable:
    proj, offset = _t(p[0]), _t(p[1])

    def score(x, pred, f, g):
        d = g @ proj + offset
        return d.gather(1, pred[:, None])[:, 0] - d.min(1).values
    return score


def _neuron(p: tuple) -> Callable:
    weights, bias = _t(p[0]), _t(p[1])

    def score(x, pred, f, g):
        return (f @ weights + bias).max(1).values
    return score


def _overlap(p: tuple) -> Callable:
    idx, pattern, mask, mu, sd = torch.as_tensor(np.asarray(p[0]), dtype=torch.long), *(_t(a) for a in p[1:])

    def score(x, pred, f, g):
        xs = x.flatten(1)[:, idx]  # (N, S)
        match = 1.0 - ((xs[:, None, :] - pattern[None]).abs() * mask[None]).sum(2)  # (N, L)
        return ((match - mu) / sd).abs().max(1).values.clamp_min(0.0)
    return score


def _token(p: tuple) -> Callable:
    first, scale = int(p[0]), _t(p[1])

    def score(x, pred, f, g):
        return (g[:, first:first + len(scale)] / scale).max(1).values
    return score


SURROGATES: dict[str, Callable[[tuple], Callable]] = {
    "feature": _feature, "knn": _knn, "inner_knn": lambda p: _knn(p, inner=True), "consistency": _consistency,
    "neuron": _neuron, "overlap": _overlap, "token": _token}
"""Torch re-implementations of the online checks' scores, by check name, built from a check's ``params()``."""


class Surrogate:
    """A differentiable copy of ``guard``'s ensemble statistic over the checks it can re-implement.

    ``tau_share`` sets the width of the smoothed calibration count, as a share of each check's clean
    score spread (interquartile range). ``in_surrogate`` lists the checks it holds, ``not_in_surrogate``
    the others with the reason. :meth:`statistic` returns ``(statistic (N,), logits (N, K))`` with gradient.
    """

    def __init__(self, guard: Guard, *, tau_share: float = 0.05):
        self.guard = guard
        self.model = guard.model
        self.tau_share = tau_share
        prof = guard.profile
        self._layer = feature_layer(self.model, prof.feature_layer)[1]
        self._inner = dict(self.model.named_modules())[prof.inner_layer] if prof.inner_layer else None
        self.in_surrogate: list[str] = []
        self.not_in_surrogate: dict[str, str] = {}
        self._scores: list[tuple[int, Callable]] = []
        for j, check in enumerate(guard.checks):
            make = SURROGATES.get(check.name)
            if make is None:
                self.not_in_surrogate[check.name] = "no differentiable re-implementation of this check"
                continue
            self._scores.append((j, make(check.params())))
            self.in_surrogate.append(check.name)
        rule = guard.ensemble
        self.rule = getattr(rule, "method", type(rule).__name__)
        if self.rule == "fisher":
            refs, lut, t0, inv_beta, shift, weights = rule.params()
            self._refs, self._t0, self._w = _t(refs), _t(t0), _t(weights)
            self._inv_beta, self._shift = _t(inv_beta), _t(shift)
            q1, q3 = np.quantile(refs, 0.25, axis=1), np.quantile(refs, 0.75, axis=1)
            spread = np.maximum(q3 - q1, 1e-3 * np.maximum(refs[:, -1] - refs[:, 0], 1e-6))
            self._tau = _t(np.maximum(tau_share * spread, 1e-6))
        elif self.rule in ("union", "UnionRule"):
            thresholds, scale = rule.params()
            self._thr, self._scale = _t(thresholds), _t(scale)
        else:
            raise ValueError(f"no differentiable surrogate for the ensemble rule {self.rule!r}")
        self.threshold = float(rule.threshold_)

    @contextlib.contextmanager
    def _frozen(self) -> Iterator[None]:
        """The model in eval mode with no parameter gradients for the block; both restored after."""
        flags = [p.requires_grad for p in self.model.parameters()]
        was_training = self.model.training
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
            self.model.train(was_training)

    def _contribution(self, j: int, s: torch.Tensor) -> torch.Tensor:
        if self.rule != "fisher":
            return (s - self._thr[j]) / self._scale[j]
        refs = self._refs[j]
        n = refs.shape[0]
        count = torch.sigmoid((refs[None, :] - s[:, None]) / self._tau[j]).sum(1)  # smoothed #refs >= s
        inside = -torch.log((count + 1.0) / (n + 1.0))
        tail = s * self._inv_beta[j] - self._shift[j]
        return self._w[j] * torch.where(s > self._t0[j], tail, inside)

    def statistic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(statistic, logits)`` of a batch ``x`` in [0, 1], differentiable in ``x``."""
        with FeatureTap(self.model, self._layer, inner=self._inner, tokens=self.guard.token_statistics) as tap:
            logits = self.model(x)
        f = tap.features
        g = None
        if self._inner is not None:
            a = tap.inner.reshape(tap.inner.shape[0], tap.inner.shape[1], -1)
            g = torch.cat([a.mean(2), a.amax(2)], 1)
        f = f if f.ndim == 2 else pool_features(f)
        pred = logits.argmax(1).detach()
        parts = [self._contribution(j, fn(x, pred, f, g)) for j, fn in self._scores]
        if not parts:
            return torch.zeros(len(x)), logits
        c = torch.stack(parts, 1)
        return (c.sum(1) if self.rule == "fisher" else c.max(1).values), logits


def _guard_figures(guard: Guard, surrogate: Surrogate, trigger: Callable[[torch.Tensor], torch.Tensor],
                   x: np.ndarray, target: int, batch: int = 256) -> dict[str, Any]:
    """The real guard (enforce mode) and the surrogate on ``x`` stamped with ``trigger``."""
    figures, real = through_guard(guard, trigger, x, target, batch=batch)
    sur = []
    with torch.no_grad(), surrogate._frozen():
        for i in range(0, len(x), batch):
            sur.append(surrogate.statistic(trigger(_t(x[i:i + batch])).clamp(0, 1))[0].numpy())
    sur_ = np.concatenate(sur).astype(np.float64)
    ok = len(x) > 2 and real.std() > 0 and sur_.std() > 0
    corr = float(np.corrcoef(real, sur_)[0, 1]) if ok else None
    return figures | {"surrogate_statistic_mean": round(float(sur_.mean()), 4),
                      "surrogate_vs_guard_correlation": None if corr is None else round(corr, 4)}


def attack_guard(model: nn.Module, attack: Attack, guard: Guard, x_attacker: np.ndarray, x_eval: np.ndarray, *,
                 budgets: tuple[Budget, ...] = DEFAULT_BUDGETS, lr: float = 0.05, batch_size: int = 32,
                 seed: int = 0, tau_share: float = 0.05, memory=None,
                 traffic: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Optimise ``attack``'s trigger against ``guard`` at every budget and measure it on ``x_eval``.

    ``x_attacker`` are the attacker's clean images and ``x_eval`` held-out clean images, both of
    classes the attack changes (stamped here). Each budget starts from the attack's own trigger.
    Returns the unoptimised trigger's figures (``baseline``), one entry per budget (``budgets``), the
    checks in and out of the surrogate and the ensemble threshold. ``model`` (the guard's) is left
    with its weights, gradients flags and mode as they were. With ``memory`` and ``traffic`` each budget
    also gives the figures with the trigger memory on a stream, and ``fresh_noise`` the strongest
    budget's trigger with fresh noise on every query (:mod:`guard.bench.stream`).
    """
    if model is not guard.model:
        raise ValueError("attack_guard: pass the guard's own model")
    surrogate = Surrogate(guard, tau_share=tau_share)
    shape = tuple(int(s) for s in x_eval.shape[1:])
    target = int(attack.target)
    out: dict[str, Any] = {"attack": type(attack).__name__, "in_surrogate": surrogate.in_surrogate,
                           "not_in_surrogate": surrogate.not_in_surrogate, "rule": surrogate.rule,
                           "ensemble_threshold": round(surrogate.threshold, 4), "n_attacker": int(len(x_attacker)),
                           "n_eval": int(len(x_eval)), "lr": lr, "batch_size": batch_size,
                           "baseline": _guard_figures(guard, surrogate, lambda xt: _t(attack.stamp(xt.numpy())), x_eval,
                                                      target),
                           "budgets": []}
    with_memory = memory_figures(guard, memory, traffic)
    out["baseline"] |= with_memory(lambda xt: _t(attack.stamp(xt.numpy())), x_eval, target)
    xa = _t(x_attacker)
    ya = torch.full((len(xa),), target, dtype=torch.long)
    plain = None  # the strongest budget that ignores the memory, and its trigger
    for b in budgets:
        t0 = time.perf_counter()
        trig, opt, gen = seeded_trigger(attack, shape, seed=seed, lr=lr)
        repeats: list[float] = []
        with surrogate._frozen():
            for _ in range(int(b.steps)):
                pick = torch.randint(0, len(xa), (min(batch_size, len(xa)),), generator=gen)
                stamped = trig(xa[pick])
                stat, logits = surrogate.statistic(stamped)
                loss = nn.functional.cross_entropy(logits, ya[pick]) + b.weight * stat.mean() / max(
                    abs(surrogate.threshold), 1e-6)
                if b.evade:
                    loss = loss + relative_loss(residual_similarity(stamped), repeats, b.evade)
                opt.zero_grad()
                loss.backward()
                opt.step()
        row = asdict(b) | _guard_figures(guard, surrogate, trig, x_eval, target)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        if repeats:
            row |= {"residual_similarity_first": round(repeats[0], 4),
                    "residual_similarity_last": round(repeats[-1], 4)}
        row |= with_memory(trig, x_eval, target)
        out["budgets"].append(row)
        plain = (b, trig) if not b.evade else plain
    if memory is not None and plain is not None:
        out["fresh_noise"] = fresh_noise_rows(guard, plain[1], plain[0], x_eval, target, with_memory, seed=seed)
    return out


def bench_row(model: nn.Module, attack: Attack, guard: Guard, x_attacker: np.ndarray, x_eval: np.ndarray, *,
              budgets: tuple[tuple[float, ...], ...], seed: int = 0, memory=None,
              traffic: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """:func:`attack_guard` as a benchmark row (``budgets`` as ``(steps, weight)`` or ``(steps, weight, evade)``),
    with the worst case through the per-input checks and, with a memory, through the default guard."""
    steps = tuple(Budget(int(b[0]), *map(float, b[1:])) for b in budgets)
    r = attack_guard(model, attack, guard, x_attacker, x_eval, budgets=steps, seed=seed, memory=memory,
                     traffic=traffic)
    r["max_residual_attack_success"] = max((b["residual_attack_success"] for b in r["budgets"]), default=None)
    if memory is not None:
        r["max_residual_attack_success_with_memory"] = max(
            (b["residual_attack_success_with_memory"] for b in r["budgets"]), default=None)
    return r
