"""Verdicts: what the guard answers for one input, and the modes that choose it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from guard.modes import MODES

VERDICTS = ("pass", "repaired", "rejected", "flagged")


def validate_mode(mode: str) -> str:
    from guard.errors import InputError

    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass
class Decision:
    """One input's outcome. ``label``/``probabilities`` are ``None`` when rejected: a rejected input
    never sees the model's (possibly hijacked) answer. ``reasons`` name the checks that fired
    (metric-label safe: no ``,`` or ``:``); ``scores`` hold every check's score and threshold.

    >>> from guard import Decision
    >>> d = Decision(None, None, "rejected", ["neuron"], {"neuron": 7.2})
    >>> d.to_dict()["verdict"], d.to_dict()["label"]
    ('rejected', None)
    """

    label: int | None
    probabilities: list[float] | None
    verdict: str
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities, "verdict": self.verdict,
                "reasons": list(self.reasons), "scores": dict(self.scores)}
