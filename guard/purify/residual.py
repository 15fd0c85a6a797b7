"""Evidence that a purified model still holds the backdoor, beyond a rescan's verdict.

A rescan judges each label's reversed-trigger norm against the *purified* model's other labels, and
purification moves those too: a backdoor that survives can look ordinary among labels that all got
cheaper. Here each suspect label's trigger is reversed again on the purified model from several
starting points (several reversed triggers per label: a backdoor that was only partly unlearned is
often found again from another start), and the cheapest one is judged against the *original* scan's
norms of the labels it did not suspect, with Neural Cleanse's own rule: an anomaly index above the
scan's threshold means the label is still as cheap to reach as a backdoor target was, so the purified
model is still suspected. Evidence found by the blend or the warp reversal is judged by the same reversal
on the purified model (:func:`blend_residual`, :func:`warp_residual`): a label that still leads is still a
target.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from guard.stats import anomaly_index


def residual_evidence(model: nn.Module, x: np.ndarray, profile, labels: list[int], *, num_classes: int,
                      starts: int = 2, seed: int = 0, device: str = "cpu", threshold: float = 2.0,
                      max_rounds: int = 60) -> dict | None:
    """Re-reverse each of ``labels`` on ``model`` (the purified one) from ``starts`` seeds and judge the
    cheapest trigger's L1 norm against the original scan's norms of the unsuspected labels (from
    ``profile.scan``, in log space as the scan's second index). Returns ``{"suspected", "labels": {label:
    {"l1", "l1_before", "anomaly", "attack_success", "suspected"}}, "threshold"}``, or None when the profile has no
    per-label scan figures to judge against."""
    from guard.scan.neural_cleanse import NeuralCleanse

    scan = getattr(profile, "scan", None)
    if not labels or scan is None or not scan.per_label:
        return None
    before = {int(p.label): float(p.l1_norm) for p in scan.per_label}
    reference = np.log(np.maximum([v for k, v in before.items() if k not in labels], 1e-8))
    if len(reference) < 3:
        return None
    found: dict[int, dict] = {}
    for start in range(starts):
        nc = NeuralCleanse(labels=labels, seed=seed + 101 + start, max_rounds=max_rounds, early_stop_patience=10,
                           progress=False, device=device).fit(model, x, num_classes=num_classes)
        for i, s in enumerate(nc.labels_):
            l1, asr = float(nc.l1_norms_[i]), float(nc.attack_success_[i])
            if int(s) not in found or l1 < found[int(s)]["l1"]:
                found[int(s)] = {"l1": round(l1, 3), "attack_success": round(asr, 4)}
    for s, f in found.items():
        f["l1_before"] = before.get(s)
        f["anomaly"] = round(float(anomaly_index([np.log(max(f["l1"], 1e-8))], reference)[0]), 3)
        f["suspected"] = f["anomaly"] > threshold
    suspected = any(f["suspected"] for f in found.values())
    return {"suspected": suspected, "labels": {str(s): f for s, f in sorted(found.items())}, "threshold": threshold,
            "starts": starts}


def blend_residual(model: nn.Module, x: np.ndarray, y: np.ndarray, labels: list[int], *, seed: int = 0) -> dict:
    """The blend reversal again on the purified ``model``: a label of ``labels`` that still needs
    clearly less opacity than every other label (lead over the reversal's threshold) is still a
    backdoor target. Returns ``{"suspected", "labels": {label: {"lead", "opacity_needed", "suspected"}},
    "threshold", "method"}``."""
    from guard.scan.blend import BlendReversal

    br = BlendReversal(seed=seed + 101, progress=False).fit(model, x, y)
    return _leads(br, br.alpha_needed_, "opacity_needed", labels, "blend-reversal")


def warp_residual(model: nn.Module, x: np.ndarray, y: np.ndarray, labels: list[int], *, seed: int = 0) -> dict:
    """The warp reversal again on the purified ``model``: a label of ``labels`` that a smooth warp still
    reaches with clearly less displacement than every other label (lead over the reversal's threshold) is
    still a backdoor target. Returns ``{"suspected", "labels": {label: {"lead", "strength_needed",
    "suspected"}}, "threshold", "method"}``."""
    from guard.scan.warp import WarpReversal

    wr = WarpReversal(seed=seed + 101, progress=False).fit(model, x, y)
    return _leads(wr, wr.strength_needed_, "strength_needed", labels, "warp-reversal")


def _leads(reversal, needed: np.ndarray, name: str, labels: list[int], method: str) -> dict:
    """A fitted reversal's verdict on ``labels``: each label's lead and what it needed (as ``name``)."""
    found = {str(s): {"lead": round(float(reversal.lead_[s]), 3), name: round(float(needed[s]), 3),
                      "suspected": bool(reversal.lead_[s] > reversal.threshold)} for s in labels}
    return {"suspected": any(f["suspected"] for f in found.values()), "labels": found,
            "threshold": reversal.threshold, "method": method}
