"""The shape every purification method shares: an estimator whose ``fit`` proposes candidate states of
a copy of the model to the accuracy-bounded :class:`~guard.purify.selection.Selection`, and whose
``apply`` loads the selected state into a model.

A method implements :meth:`Purifier.propose` only. :meth:`Purifier.fit` holds out the clean images
the bound is measured on (or takes them as ``validation``), offers the original model first (so that
when nothing is within the bound the original wins and ``ok_`` is false), scores the kept candidates
with every trigger known at the end and keeps the one they move least.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from guard.data import split
from guard.errors import InputError
from guard.model import num_classes
from guard.purify.evidence import WARP_SPREAD, Evidence
from guard.purify.selection import Selection
from guard.purify.triggers import Trigger, anywhere, reversed_triggers, trigger_success
from guard.purify.tuning import bare, state_of

REGISTRY: dict[str, type[Purifier]] = {}
"""Every purification method by its ``--method`` name (each :class:`Purifier` subclass adds itself)."""

MIN_PER_CLASS = 10
"""Clean images per class every method needs: below it the held-out part (a quarter) has fewer than 2
images per class, too few to bound the accuracy drop, and the learning part too few to fine-tune on."""


def validate_data(y: np.ndarray, k: int, method: str, *, need: int = MIN_PER_CLASS) -> None:
    """Refuse (InputError) when a class has fewer than ``need`` clean images."""
    counts = np.bincount(y, minlength=k)
    worst = int(counts.argmin())
    if counts[worst] < need:
        raise InputError(f"{method} needs at least {need} clean images per class; class {worst} has "
                         f"{int(counts[worst])} ({len(y)} images in all)")


@dataclass
class Candidates:
    """What a method's :meth:`Purifier.propose` works with: the learning images, the evidence, the
    selection to :meth:`offer` states to, the triggers the candidates are scored with (a method may add
    what it learns, e.g. re-reversed triggers) and a ``details`` dict for its report."""

    x: np.ndarray
    y: np.ndarray
    evidence: Evidence
    selection: Selection
    original: nn.Module
    num_classes: int
    scoring: list[tuple[int, Trigger]] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def offer(self, step: str, model: nn.Module) -> bool:
        """Offer ``model``'s current state as candidate ``step``; True when within the bound."""
        return self.selection.offer(step, model)

    def offer_steps(self, tag: str, model: nn.Module, apply, counts) -> int:
        """Offer ``apply(model, n)`` as candidate ``tag:n`` for each ``n`` in ``counts`` (growing),
        from the same starting state each time; stop at the first over the bound. Leaves ``model`` as
        it was; returns the last ``n`` within the bound (0 when none)."""
        base = state_of(model)
        kept = 0
        for n in counts:
            model.load_state_dict(base)
            apply(model, n)
            if not self.offer(f"{tag}:{n}", model):
                break
            kept = n
        model.load_state_dict(base)
        return kept

    def offer_epochs(self, tag: str, model: nn.Module, epochs, *, patience: int = 4) -> None:
        """Offer ``model`` as candidate ``tag:e`` after every epoch ``e`` that ``epochs`` (a
        :func:`~guard.purify.tuning.finetune_epochs` iterator training ``model``) yields; stop after
        ``patience`` epochs in a row over the bound."""
        over = 0
        for e in epochs:
            over = 0 if self.offer(f"{tag}:{e}", model) else over + 1
            if over >= patience:
                break

    def rereverse(self, model: nn.Module, round_: int, *, seed: int = 0, device: str = "cpu",
                  progress: bool | None = None) -> list[tuple[int, Trigger]]:
        """The suspect labels' triggers reversed again on the partly purified ``model``, the way the
        evidence found them: what still fires the backdoor once the triggers found so far are unlearned
        (a backdoor with several triggers, or one the first reversal only partly found, shows another
        one here). The new triggers join the scoring list and are returned, with their labels, for
        unlearning.

        Patch evidence: Neural Cleanse for the suspect labels, each trigger where found and pasted
        anywhere; L1 norms to ``details["re_reversed_l1"]``. Blend evidence: a key at the evidence's
        opacity and one at the opacity natural labels need (:func:`~guard.scan.blend.blend_keys`);
        their success to ``details["re_reversed_blend"]``. Warp evidence: the warp reversal, each suspect
        label's field at the strength it now needs; strength and lead to ``details["re_reversed_warp"]``."""
        if self.evidence.kind == "blend":
            return self._rereverse_blend(model, round_, seed=seed)
        if self.evidence.kind == "warp":
            return self._rereverse_warp(model, round_, seed=seed)
        from guard.scan.neural_cleanse import NeuralCleanse

        labels = self.evidence.labels
        nc = NeuralCleanse(labels=labels, seed=seed + round_, max_rounds=60, early_stop_patience=10,
                           progress=progress, device=device).fit(model, self.x, num_classes=self.num_classes)
        self.details.setdefault("re_reversed_l1", []).append([round(float(v), 2) for v in nc.l1_norms_])
        new = reversed_triggers(labels, nc.masks_, nc.patterns_)
        moved = anywhere(new)
        self.scoring.extend([(s, Trigger(t.mask, t.pattern)) for s, t in new] + moved)
        return new + moved

    def _rereverse_blend(self, model: nn.Module, round_: int, *, seed: int) -> list[tuple[int, Trigger]]:
        from guard.scan.blend import blend_keys

        ev, shape = self.evidence, self.x.shape[2:]
        found, rows = [], []
        for i, label in enumerate(ev.labels):
            found_at = round(float(ev.masks[i].max()), 4)
            opacities = sorted({found_at, *([ev.natural_opacity] if ev.natural_opacity else [])})
            for alpha in opacities:
                keys, success = blend_keys(model, self.x, self.y, [label], alpha=alpha, seed=seed + round_)
                t = Trigger(torch.full((1, *shape), alpha), torch.from_numpy(keys[0]))
                found.append((label, t))
                self.scoring.append((label, t))
                rows.append({"label": label, "opacity": alpha, "success": round(float(success[0]), 3)})
        self.details.setdefault("re_reversed_blend", []).append(rows)
        return found

    def _rereverse_warp(self, model: nn.Module, round_: int, *, seed: int) -> list[tuple[int, Trigger]]:
        from guard.scan.warp import WarpReversal

        wr = WarpReversal(seed=seed + round_, progress=False).fit(model, self.x, self.y, num_classes=self.num_classes)
        self.scoring.extend((label, Trigger.warping(wr.fields_[label])) for label in self.evidence.labels)
        found = [(label, Trigger.warping(wr.fields_[label], spread=WARP_SPREAD)) for label in self.evidence.labels]
        self.details.setdefault("re_reversed_warp", []).append(
            [{"label": label, "strength": round(float(wr.strength_needed_[label]), 3),
              "lead": round(float(wr.lead_[label]), 3)} for label in self.evidence.labels])
        return found

    def unlearning(self, *, every: int, lead: float | None = None, seed: int = 0, device: str = "cpu",
                   progress: bool | None = None) -> tuple[list[Trigger], Callable[[nn.Module], list[Trigger]] | None]:
        r"""The triggers to unlearn from the first epoch and a ``refresh`` for
        :func:`~guard.purify.tuning.finetune_epochs` that every ``every`` epochs :meth:`rereverse`\ s the
        suspect labels on the model being tuned and returns the triggers to unlearn from then on (None: no
        refresh, when ``every`` is 0 or there is no suspect label).

        Every suspect label's reversed trigger is stamped where it was found and pasted anywhere. With
        ``lead`` and patch evidence naming several labels, the cheapest evidence goes first: a label joins
        the unlearning once its trigger (the latest found, by mask L1) costs at most ``lead`` times the
        cheapest label's, and stays in once it has joined. A natural label that Neural Cleanse names beside
        a backdoor's target costs several times the target's trigger; unlearning both from the start gives
        it a share of a few hundred images' capacity and of the accuracy bound (docs/benchmarks.md,
        'Purification'). When the target's trigger is unlearned its re-reversal costs more, and the next
        label joins; two real targets of similar cost join together."""
        trigs = self.evidence.triggers()
        pairs = trigs + anywhere(trigs)
        cost = None  # with lead, on patch evidence: each label's latest reversed trigger's mask L1
        if lead is not None and self.evidence.kind == "patch" and len(self.evidence.labels) > 1:
            cost = {s: float(t.mask.sum()) for s, t in trigs}
        joined: set[int] = set()

        def current() -> list[Trigger]:
            if cost is None:
                return [t for _, t in pairs]
            cheapest = min(cost.values())
            joined.update(s for s, v in cost.items() if v <= lead * cheapest)
            self.details["unlearned_labels"] = sorted(joined)
            return [t for s, t in pairs if s in joined]

        if every <= 0 or not self.evidence:
            return current(), None
        epoch = iter(range(1, 10_000))

        def refresh(model: nn.Module) -> list[Trigger]:
            e = next(epoch)
            if e % every == 0:
                found = self.rereverse(model, e // every, seed=seed, device=device, progress=progress)
                pairs.extend(found)
                if cost is not None:
                    cost.update((s, float(t.mask.sum())) for s, t in found)
            return current()

        return current(), refresh


def offer_mask_pruning(tag: str, est, model: nn.Module, c: Candidates, *, threshold: float,
                       max_share: float) -> dict:
    """Offer ``est.prune(model, n)`` (a fitted neuron-mask estimator: ANP, RNP) as candidate ``tag:n``
    for growing ``n`` (steps of 0.5% of the neurons, at least one) up to the neurons whose mask is under
    ``threshold``, at most ``max_share`` of them; stop at the first step over the bound. Leaves ``model``
    as it was; returns the counts for ``details``."""
    total = len(est.order_)
    below = int((est.values_ < threshold).sum())
    limit = min(below, int(max_share * total))
    step = max(1, total // 200)
    counts = list(range(step, limit, step)) + ([limit] if limit > 0 else [])
    c.offer_steps(tag, model, est.prune, counts)
    return {"neurons": total, "below_threshold": below, "seconds": round(est.seconds_, 2)}


def pruned_count(tag: str, selected: str | None) -> int:
    """How many neurons the selected ``tag:n`` step switched off (0 when another step won)."""
    return int(selected.split(":")[1]) if selected and selected.startswith(f"{tag}:") else 0


class Purifier:
    """Base of the purification estimators (keyword-only hyperparameters, ``fit`` returns ``self``).

    Every method takes these; a method's own class lists only its own parameters and passes the other
    keywords here.

    Parameters
    ----------
    max_drop
        Largest clean-accuracy drop (a fraction, 0.02 = 2 points) on the held-out images a selected
        state may have; 0.02, the bound ``guard purify --max-accuracy-drop`` defaults to.
    holdout_share
        Share of the clean images held out for the bound when ``fit`` is not given ``validation``
        (stratified); 0.25, which with :data:`MIN_PER_CLASS` images leaves at least 2 per class.
    seed
        Seeds every draw (split, batches, stamps, optimisations).
    progress
        Progress bars on stderr; None: when stderr is a terminal (or ``GUARD_PROGRESS=1``).
    device
        Where Neural Cleanse optimisations run (``cpu`` or ``cuda[:N]``); fine-tuning on a few hundred
        images stays on the CPU.

    Learned attributes: ``ok_`` (a state other than the original is within the bound), ``selected_``
    (its step name), ``history_`` (every candidate), ``accuracy_before_``/``accuracy_after_`` (held
    out), ``model_`` (the purified copy, None when not ``ok_``), ``state_dict_`` (loads into the user's
    model file), ``details_``, ``scoring_`` (the triggers the candidates were scored with), ``seconds_``.
    """

    #: the name ``guard purify --method`` knows it by
    method: str = ""
    #: whether the method needs a reversed trigger (a profile with a suspect label)
    needs_evidence: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.method:
            REGISTRY[cls.method] = cls

    def __init__(self, *, max_drop: float = 0.02, holdout_share: float = 0.25, seed: int = 0,
                 progress: bool | None = None, device: str = "cpu"):
        self.max_drop = max_drop
        self.holdout_share = holdout_share
        self.seed = seed
        self.progress = progress
        self.device = device

    def propose(self, model: nn.Module, c: Candidates) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, model: nn.Module, x: np.ndarray, y: np.ndarray, *, evidence: Evidence | None = None,
            validation: tuple[np.ndarray, np.ndarray] | None = None) -> Purifier:
        """Propose candidate states of a copy of ``model`` learned from ``(x, y)`` (and ``evidence``)
        and select the best within the bound, measured on ``validation`` (default: ``holdout_share`` of
        ``(x, y)`` held out, stratified). The caller's model is never modified."""
        t0 = time.perf_counter()
        evidence = evidence if evidence is not None else Evidence()
        if self.needs_evidence and not evidence:
            raise InputError(f"{self.method} needs a reversed trigger and the profile lists no suspect label; "
                             f"use a method that works from clean images alone (rnp, sau, anp, fine-pruning)")
        torch.manual_seed(self.seed)
        if validation is None:
            x, y, x_val, y_val = split(x, y, 1 - self.holdout_share, seed=self.seed)
        else:
            x_val, y_val = validation
        model = model.eval()
        sel = Selection(model, x_val, y_val, max_drop=self.max_drop)
        sel.offer("original", model)
        c = Candidates(x, y, evidence, sel, model, num_classes(model, x), scoring=evidence.scoring())
        work = copy.deepcopy(model).eval()
        self.propose(work, c)

        def score(mdl):  # the mean over every trigger known at the end: a late re-reversed trigger, which
            # fires on every earlier state, must not flatten the differences the others show
            return float(np.mean([trigger_success(mdl, x, y, s, t, seed=self.seed) for s, t in c.scoring]))

        sel.finish(work, score if c.scoring else None, tie=1.0 / max(len(x), 1))  # one image's worth
        self.ok_ = sel.step != "original"
        self.selected_ = sel.step
        self.history_ = sel.history
        self.accuracy_before_ = sel.base
        self.scoring_ = c.scoring
        self.details_ = c.details
        self._selection = sel
        if self.ok_:
            self.model_ = copy.deepcopy(work).eval()
            self.model_.load_state_dict(sel.state)
            self.accuracy_after_ = next(h["clean_accuracy"] for h in sel.history if h["step"] == sel.step)
            self.state_dict_ = state_of(bare(self.model_))
        else:  # nothing within the bound: report the best figure a purified state reached
            self.model_, self.state_dict_ = None, None
            self.accuracy_after_ = max((h["clean_accuracy"] for h in sel.history[1:]), default=sel.base)
        self.seconds_ = round(time.perf_counter() - t0, 2)
        return self

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with the selected state loaded (``model`` is the user's module, or guard's
        normalising wrapper around it)."""
        if not getattr(self, "ok_", False):
            raise InputError(f"{self.method} kept no state within the accuracy bound; nothing to apply")
        out = copy.deepcopy(model).eval()
        bare(out).load_state_dict(self.state_dict_)
        return out

    def paired_counts(self) -> tuple[int, int, int]:
        """On the held-out images: ``(n, broken, fixed)``, images the original got right and the selected
        state gets wrong, and the reverse (what the confidence bound of the drop is computed from)."""
        sel = self._selection
        n = len(sel.y_val)
        if self.model_ is None or n == 0:
            return n, 0, 0
        from guard.model import predict

        before = sel.base_predictions == sel.y_val
        after = predict(self.model_, sel.x_val) == sel.y_val
        return n, int((before & ~after).sum()), int((~before & after).sum())
