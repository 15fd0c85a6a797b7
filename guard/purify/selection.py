"""The accuracy-bounded selection every purification method offers its candidate states to.

A method proposes states (pruning steps, fine-tuning epochs); each is measured on held-out clean
images the method never learns from. States whose drop from the original exceeds ``max_drop`` are
discarded, and among the rest the one the known triggers move least wins. Nothing over the bound can
be selected, so nothing over the bound is ever written.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from guard.model import accuracy, predict
from guard.purify.tuning import state_of


class Selection:
    """Candidate states within the accuracy bound; :meth:`finish` keeps the one the known triggers move least.

    Candidates are scored when the method is done, with every trigger known by then (a trigger
    re-reversed late in the purification scores the early candidates too). ``history`` lists every candidate
    as ``{"step", "clean_accuracy", "trigger_success", "within"}``.
    """

    def __init__(self, model: nn.Module, x_val: np.ndarray, y_val: np.ndarray, *, max_drop: float):
        self.x_val, self.y_val = x_val, y_val
        self.base_predictions = predict(model, x_val)
        self.base = float((self.base_predictions == y_val).mean()) if len(y_val) else float("nan")
        self.max_drop = max_drop
        self.kept: list[tuple[str, float, dict[str, torch.Tensor]]] = []
        self.state: dict[str, torch.Tensor] | None = None
        self.step: str | None = None
        self.history: list[dict] = []

    def offer(self, step: str, model: nn.Module) -> bool:
        """Measure ``model`` as candidate ``step``; True when it is within the bound."""
        acc = accuracy(model, self.x_val, self.y_val)
        within = self.base - acc <= self.max_drop + 1e-9
        self.history.append({"step": step, "clean_accuracy": acc, "trigger_success": None, "within": within})
        if within:
            self.kept.append((step, acc, state_of(model)))
        return within

    def finish(self, model: nn.Module, score: Callable[[nn.Module], float] | None, *, tie: float = 0.0) -> None:
        """Pick the kept candidate with the lowest ``score(model)``, scores within ``tie`` of the lowest
        counting as tied (then the higher accuracy, then the later one); with ``score`` None, the last one
        kept (the method's own choice).

        ``tie`` is what one scoring image is worth: two states the known triggers move alike to within an
        image are not told apart by them, and the one that kept more accuracy is the better."""
        if not self.kept:
            return
        if score is None:
            self.step, _, self.state = self.kept[-1]
            return
        probe = copy.deepcopy(model)
        scores = []
        for step, _, state in self.kept:
            probe.load_state_dict(state)
            s = score(probe.eval())
            next(h for h in self.history if h["step"] == step)["trigger_success"] = s
            scores.append(s)
        floor = min(scores) + tie
        best = None
        for (step, acc, state), s in zip(self.kept, scores):
            if s <= floor and (best is None or acc >= best):
                best, self.step, self.state = acc, step, state

