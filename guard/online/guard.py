"""Guard: the production model wrapped with its profile; one forward pass per batch, then verdicts."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data import validate_batch
from ..errors import ModelError
from ..model import FeatureTap, fingerprint
from ..profile import Profile
from . import repair as _repair
from .checks import CHECKS, Check, Record
from .policy import Decision, check_mode


@dataclass
class GuardResult:
    """Decisions for a batch and where the time went (``guard_ms`` excludes the model's forward)."""

    decisions: list[Decision]
    forward_ms: float
    guard_ms: float


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


class Guard:
    """Wrap ``model`` with ``profile`` and decide pass | repaired | rejected | flagged per input.

    ``mode`` overrides the profile's policy: ``enforce`` rejects suspect inputs, ``repair`` paints
    the located trigger over and re-classifies (rejecting what stays suspect), ``shadow`` answers as
    the model did and flags. The model's fingerprint must match the profile's unless
    ``verify=False`` (the caller already checked it).
    """

    def __init__(self, model: nn.Module, profile: Profile, *, mode: str | None = None, verify: bool = True):
        if verify and fingerprint(model) != profile.model_sha256:
            from ..errors import ProfileMismatch

            raise ProfileMismatch("the profile was built for another model (SHA-256 differs): rescan it")
        self.model = model.eval()
        self.profile = profile
        self.mode = check_mode(mode or profile.meta.get("policy", {}).get("mode", "enforce"))
        self.input_shape = profile.input_shape
        self.layer = profile.meta.get("feature_layer")
        self.checks: list[Check] = []
        thresholds = []
        for name, info in profile.meta["checks"].items():
            prefix = f"check.{name}."
            state = {k[len(prefix):]: v for k, v in profile.tensors.items() if k.startswith(prefix)}
            check = CHECKS[name].from_state(state)
            check.threshold_, check.fpr_ = float(info["threshold"]), float(info["fpr"])
            self.checks.append(check)
            thresholds.append(check.threshold_)
        if not self.checks:
            raise ModelError("the profile has no calibrated checks")
        self.thresholds = np.asarray(thresholds)
        self.names = [c.name for c in self.checks]
        self.fill = profile.tensors["fill"].astype(np.float32)
        self.repair_pixels = int(profile.meta.get("repair", {}).get("pixels", 16))
        neuron = next((c for c in self.checks if c.name == "neuron"), None)
        self._neuron = (neuron.weights, neuron.bias) if neuron is not None else (None, None)
        self._masks = profile.tensors.get("masks")

    # ------------------------------------------------------------------ core
    def _forward(self, x: np.ndarray) -> Record:
        with torch.inference_mode(), FeatureTap(self.model, self.layer) as tap:
            logits = self.model(torch.from_numpy(x))
            return Record(x, logits.numpy(), tap.features.numpy())

    def scores(self, record: Record) -> np.ndarray:
        """``(N, n_checks)`` scores of a record, columns in ``self.names`` order."""
        return np.stack([c.score(record) for c in self.checks], 1)

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every check's score for a batch (for evaluation and benchmarks)."""
        s = self.scores(self._forward(validate_batch(x, shape=self.input_shape)))
        return {n: s[:, i] for i, n in enumerate(self.names)}

    def run(self, x: np.ndarray | torch.Tensor) -> GuardResult:
        """Validate, forward once with the feature tap, score, apply the policy."""
        t0 = time.perf_counter()
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = validate_batch(x, shape=self.input_shape, what="input")
        t1 = time.perf_counter()
        rec = self._forward(x)
        t2 = time.perf_counter()
        s = self.scores(rec)
        over = s > self.thresholds
        suspect = over.any(1)
        labels = rec.logits.argmax(1)
        probs = _softmax(rec.logits)
        verdicts = np.where(suspect, "rejected" if self.mode == "enforce" else
                            ("flagged" if self.mode == "shadow" else "repaired"), "pass").astype(object)
        repaired = {}
        if self.mode == "repair" and suspect.any():
            repaired = self._repair(x[suspect], np.flatnonzero(suspect))
        decisions = []
        for i in range(len(x)):
            reasons = [self.names[j] for j in np.flatnonzero(over[i])]
            sc = {n: round(float(s[i, j]), 4) for j, n in enumerate(self.names)}
            verdict, label, p = verdicts[i], int(labels[i]), probs[i]
            if i in repaired:
                ok, label, p, s2 = repaired[i]
                sc.update({f"{n}_repaired": round(float(s2[j]), 4) for j, n in enumerate(self.names)})
                verdict = "repaired" if ok else "rejected"
            if verdict == "rejected":
                decisions.append(Decision(None, None, "rejected", reasons, sc))
            else:
                decisions.append(Decision(label, [round(float(v), 6) for v in p], verdict, reasons, sc))
        t3 = time.perf_counter()
        return GuardResult(decisions, (t2 - t1) * 1e3, ((t1 - t0) + (t3 - t2)) * 1e3)

    def predict(self, x: np.ndarray | torch.Tensor) -> list[Decision]:
        """Decisions for a batch ``(N, C, H, W)`` in [0, 1]; raises InputError on bad input."""
        return self.run(x).decisions

    def _repair(self, x: np.ndarray, index: np.ndarray) -> dict[int, tuple]:
        w, b = self._neuron
        region = _repair.locate(self.model, x, self.fill, pixels=self.repair_pixels, layer=self.layer,
                                neuron_weights=w, neuron_bias=b, masks=self._masks)
        fixed = _repair.apply(x, region, self.fill)
        rec = self._forward(fixed)
        s = self.scores(rec)
        still = (s > self.thresholds).any(1)
        probs = _softmax(rec.logits)
        labels = rec.logits.argmax(1)
        return {int(i): (not still[j], int(labels[j]), probs[j], s[j]) for j, i in enumerate(index)}
