"""``--method auto``: run the methods that fit the model and the evidence, each within the same bound
on the same held-out images, and keep the one whose result the known triggers move least.

Which method holds depends on the model (BatchNorm or not, where the backdoor lives) and on whether
the scan's reversed trigger is the attacker's or only close to it; no single method is best on every
model. The choice is made per model from what the command can measure: every candidate method's
selected state must be within the accuracy bound; among those, the lowest mean success of every
trigger any of them knows (the profile's reversed triggers, where found and pasted anywhere, and
what combined and bn-tune reversed again on their partly purified models) wins, then the higher
held-out accuracy. The cost is the sum of the candidates' costs.
"""

from __future__ import annotations

from torch import nn

from guard.errors import InputError
from guard.purify.base import REGISTRY, Candidates, Purifier
from guard.purify.combined import CombinedUnlearning
from guard.purify.norm_tuning import NormTuning
from guard.purify.rnp import RNPPruning
from guard.purify.sau import SharedAdversarialUnlearning
from guard.purify.tuning import norm_layers


def candidate_methods(model: nn.Module, has_evidence: bool) -> list[type[Purifier]]:
    """The methods ``auto`` tries: with a reversed trigger, combined unlearning and BatchNorm-aware
    tuning; without one, shared adversarial unlearning and BatchNorm-aware tuning on its adversarial
    images; RNP besides on models with BatchNorm (where it holds)."""
    out: list[type[Purifier]] = ([CombinedUnlearning, NormTuning] if has_evidence
                                 else [SharedAdversarialUnlearning, NormTuning])
    if norm_layers(model):
        out.append(RNPPruning)
    return out


class Auto(Purifier):
    """``--method auto``: learned attributes add ``chosen_`` (the winning method, None when none was
    within the bound), ``runs_`` (every candidate method's fitted estimator) and ``details_["auto"]``
    (every candidate's held-out accuracy, residual trigger success and seconds).

    Parameters
    ----------
    methods
        Method names to try (``--method`` names; None: :func:`candidate_methods`, the ones that fit the
        model and the evidence).

    Other keywords go to :class:`~guard.purify.base.Purifier` (``max_drop``, ``holdout_share``, ``seed``,
    ``progress``, ``device``).
    """

    method = "auto"

    def __init__(self, *, methods: tuple[str, ...] | None = None, **kw):
        super().__init__(**kw)
        self.methods = methods

    def fit(self, model, x, y, **kw) -> Auto:
        super().fit(model, x, y, **kw)
        self.chosen_ = self.selected_.split("/")[0] if self.ok_ else None
        scored = {h["step"]: h["trigger_success"] for h in self.history_}  # the selection scored every run
        for name, row in self.details_["auto"].items():
            row["residual"] = scored.get(f"{name}/{row['selected']}") if row["ok"] else None
        return self

    def _classes(self, model: nn.Module, c: Candidates) -> list[type[Purifier]]:
        if self.methods is None:
            return candidate_methods(model, bool(c.evidence))
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise InputError(f"auto: unknown method(s) {unknown} ({', '.join(REGISTRY)})")
        return [REGISTRY[m] for m in self.methods if m != "auto"]

    def propose(self, model: nn.Module, c: Candidates) -> None:
        sel = c.selection
        shared = len(c.scoring)  # every run starts from the same evidence triggers; only what it adds is new
        runs = []
        for cls in self._classes(model, c):
            if cls.needs_evidence and not c.evidence:
                continue
            est = cls(max_drop=self.max_drop, seed=self.seed, progress=self.progress, device=self.device)
            est.fit(c.original, c.x, c.y, evidence=c.evidence, validation=(sel.x_val, sel.y_val))
            runs.append(est)
            c.scoring.extend(est.scoring_[shared:])
        rows = {}
        for est in runs:  # residual: filled in by fit from the selection's own scores
            rows[est.method] = {"ok": est.ok_, "selected": est.selected_, "heldout_accuracy": est.accuracy_after_,
                                "residual": None, "seconds": est.seconds_}
            if est.ok_:
                model.load_state_dict(est.model_.state_dict())
                c.offer(f"{est.method}/{est.selected_}", model)
        c.details["auto"] = rows
        self.runs_ = runs
