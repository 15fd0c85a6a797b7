"""What a purification may use besides clean images: the profile's evidence of the backdoor.

Every method reads the same :class:`Evidence` (suspect labels and their reversed triggers, as
``guard scan`` wrote them) and never the attacker's trigger. A profile with no suspect label gives
empty evidence; methods that need a reversed trigger refuse it, the others (ANP, RNP, adversarial
unlearning, BatchNorm-aware tuning, Fine-Pruning) run on clean images alone. :meth:`Evidence.gather`
adds what the warp and blend reversals find where Neural Cleanse found nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from guard.errors import InputError
from guard.purify.triggers import Trigger, anywhere, reversed_triggers

WARP_SPREAD = 2.0
"""How far a reversed warp field is scaled either way when it is unlearned (:meth:`Evidence.triggers`)."""


@dataclass
class Evidence:
    """Suspect ``labels`` and one reversed trigger each: ``masks`` ``(n, 1, H, W)`` and ``patterns``
    ``(n, C, H, W)`` in raw pixel space (rows in the order of ``labels``).

    ``kind`` says how the triggers were found, so that a method reverses them again the same way:
    ``"patch"`` (Neural Cleanse: a region, from the profile), ``"blend"`` (a key over the whole image
    at one opacity, from the blend reversal) or ``"warp"`` (a smooth displacement field per label,
    ``fields`` ``(n, 2, H, W)`` in pixels, from the warp reversal; no masks or patterns); for a blend,
    ``natural_opacity`` is the opacity the unsuspected labels needed (the median), the strength at which
    any label's key wins."""

    labels: list[int] = field(default_factory=list)
    masks: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    patterns: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    kind: str = "patch"
    natural_opacity: float | None = None
    fields: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    @classmethod
    def from_profile(cls, profile, labels: list[int] | None = None) -> Evidence:
        """The reversed triggers of the profile's suspect labels (or of ``labels``).

        Reads ``all_masks``/``all_patterns`` (indexed by label) when the profile has them, else
        ``masks``/``patterns`` (one row per suspect label, in the order of ``suspect_labels``).
        """
        labels = [int(s) for s in (profile.suspect_labels if labels is None else labels)]
        t = profile.tensors
        if not labels:
            return cls()
        if "all_masks" in t and "all_patterns" in t:
            _validate_rows(labels, len(t["all_masks"]), "suspect label(s)", "reversed triggers")
            return cls(labels, t["all_masks"][labels], t["all_patterns"][labels])
        if "masks" in t and "patterns" in t and len(t["masks"]) == len(profile.suspect_labels):
            rows = [profile.suspect_labels.index(s) for s in labels]
            return cls(labels, t["masks"][rows], t["patterns"][rows])
        raise InputError("the profile holds no reversed triggers (all_masks/all_patterns); rescan with guard scan")

    @classmethod
    def from_blend_reversal(cls, model, x: np.ndarray, y: np.ndarray, *, seed: int = 0,
                            progress: bool | None = None) -> tuple[Evidence, dict]:
        """Evidence of a whole-image backdoor when the profile has none: :class:`~guard.scan.blend.BlendReversal`
        on the clean images, each label it flags with its reversed key as a trigger (a mask of the key's
        opacity everywhere). Neural Cleanse, which ``guard scan`` runs, looks for the smallest region and
        misses blended, warped and signal backdoors; without this a purification of such a model has
        nothing to unlearn. Returns the evidence and what the reversal measured (for the report)."""
        from guard.scan.blend import BlendReversal

        br = BlendReversal(seed=seed, progress=progress).fit(model, x, y)
        opacity = br.opacity_
        labels, info = _found(br)
        if not labels:
            return cls(), info
        h, w = x.shape[-2:]
        masks = np.stack([np.full((1, h, w), opacity[s], np.float32) for s in labels])
        natural = np.delete(br.alpha_needed_, labels)
        return cls(labels, masks, br.patterns_[labels].astype(np.float32), kind="blend",
                   natural_opacity=float(np.median(natural)) if len(natural) else None), info

    @classmethod
    def from_warps(cls, labels: list[int], fields: np.ndarray) -> Evidence:
        """Warping evidence: each label of ``labels`` with its reversed displacement field (rows of ``fields``
        ``(n, 2, H, W)``, pixels)."""
        fields = np.asarray(fields, np.float32)
        if fields.ndim != 4 or fields.shape[1] != 2 or len(fields) != len(labels):
            raise InputError(f"warp evidence needs one (2, H, W) field per label: {len(labels)} label(s), "
                             f"fields of shape {tuple(fields.shape)}")
        return cls([int(s) for s in labels], kind="warp", fields=fields)

    @classmethod
    def from_profile_warp(cls, profile) -> Evidence:
        """The warp reversal's suspect labels and their fields as ``guard scan`` stored them in the profile
        (empty when the scan did not run it, flagged nothing, or the fields are missing)."""
        w = getattr(profile, "warp", None)
        fields = profile.tensors.get("warp.fields")
        if w is None or not w.suspect_labels or fields is None:
            return cls()
        labels = [int(s) for s in w.suspect_labels]
        _validate_rows(labels, len(fields), "warp suspect label(s)", "warp fields")
        return cls.from_warps(labels, np.asarray(fields)[labels])

    @classmethod
    def from_warp_reversal(cls, model, x: np.ndarray, y: np.ndarray, *, seed: int = 0,
                           progress: bool | None = None) -> tuple[Evidence, dict]:
        """Evidence of a warping backdoor (WaNet) when the profile has none (:meth:`gather` asks it before the
        blend reversal): :class:`~guard.scan.warp.WarpReversal` on the clean images, each label it flags with its
        reversed field. Returns the evidence and what the reversal measured (for the report)."""
        from guard.scan.warp import WarpReversal

        wr = WarpReversal(seed=seed, progress=progress).fit(model, x, y)
        labels, info = _found(wr)
        return (cls.from_warps(labels, wr.fields_[labels]) if labels else cls()), info

    @classmethod
    def gather(cls, model, x: np.ndarray, y: np.ndarray, profile, *, search: bool = True, seed: int = 0,
               progress: bool | None = None) -> tuple[Evidence, dict]:
        """Everything a purification may unlearn, first found first: the profile's Neural Cleanse triggers,
        else the warp fields ``guard scan`` stored in it, else (``search``) what the warp reversal flags on the
        clean ``x``, ``y`` (when the profile holds no warp result: the scan did not run it), else what the
        blend reversal flags. Neural Cleanse looks for the smallest region and misses blended, warped and
        signal backdoors; without the reversals a purification of such a model has nothing to unlearn. The
        warp reversal goes before the blend reversal because it flagged no clean, patch or blended model of
        the layouts measured, where the blend reversal flags a natural sink on 4 of 10 clean models of the
        less robust ones (docs/benchmarks.md, guard/scan/warp.py): asked first, a blend reversal's sink would
        hide a warp. Returns the evidence and ``{"source": "profile" | "profile-warp" | "warp-reversal" |
        "blend-reversal" | None, "warp_reversal": ..., "blend_reversal": ...}`` (what each reversal run
        measured)."""
        evidence = cls.from_profile(profile)
        if evidence:
            return evidence, {"source": "profile"}
        evidence = cls.from_profile_warp(profile)
        if evidence:
            return evidence, {"source": "profile-warp"}
        source: dict = {"source": None}
        if not search:
            return evidence, source
        if getattr(profile, "warp", None) is None:
            evidence, source["warp_reversal"] = cls.from_warp_reversal(model, x, y, seed=seed, progress=progress)
            if evidence:
                source["source"] = "warp-reversal"
                return evidence, source
        evidence, source["blend_reversal"] = cls.from_blend_reversal(model, x, y, seed=seed, progress=progress)
        source["source"] = "blend-reversal" if evidence else None
        return evidence, source

    def __bool__(self) -> bool:
        return bool(self.labels)

    def triggers(self, *, jitter: int = 2) -> list[tuple[int, Trigger]]:
        """``(label, trigger)`` per suspect label, stamped where found, moved by up to ``jitter`` pixels (a
        warping trigger's field applied to the whole image; with ``jitter``, scaled by up to
        :data:`WARP_SPREAD` times either way: the reversed field is one warp that works, at the smallest
        strength that does, and the attacker's may be stronger or weaker)."""
        if self.kind == "warp":
            spread = WARP_SPREAD if jitter else 1.0
            return [(int(s), Trigger.warping(f, spread=spread)) for s, f in zip(self.labels, self.fields)]
        return reversed_triggers(self.labels, self.masks, self.patterns, jitter=jitter)

    def scoring(self) -> list[tuple[int, Trigger]]:
        """What the selection scores candidates with: each trigger where it was found and pasted anywhere."""
        fixed = self.triggers(jitter=0)
        return fixed + anywhere(fixed)


def _found(reversal) -> tuple[list[int], dict]:
    """A fitted reversal's (blend, warp) suspect labels and what the report keeps of it."""
    labels = [int(s) for s in reversal.suspect_labels_]
    return labels, {"suspect_labels": labels, "lead": [round(float(v), 3) for v in reversal.lead_],
                    "threshold": reversal.threshold, "seconds": round(reversal.seconds_, 1)}


def _validate_rows(labels: list[int], k: int, what: str, rows: str) -> None:
    """InputError when a label of ``labels`` has no row among the profile's ``k`` ``rows``."""
    bad = [s for s in labels if not 0 <= s < k]
    if bad:
        raise InputError(f"{what} {bad} are outside the profile's {k} {rows}")
