"""The offline audit: run the selected detectors, combine their decisions, and export the result.

``run_audit`` validates its input once (so a bad data file fails in a second, not after a scan),
runs Neural Cleanse, DL-TND, DF-TND, the blend reversal and the warp reversal as chosen, and returns an
:class:`AuditResult`: a JSON-ready
summary (``to_json``) plus the arrays the HTML report draws. ``write_metrics`` turns it into
Prometheus text exposition for node_exporter's textfile collector.

How the verdict is combined: a model is backdoored when a calibrated method flags it (:data:`DECISIVE`):
Neural Cleanse (its MAD test *and* its isolation bar), DF-TND, the blend reversal and the warp reversal,
whose bars were set on clean and backdoored models (``tests/scan/nc_calibration.py``,
``tests/scan/dftnd_calibration.py``, ``tests/scan/blend_calibration.py``; the warp reversal's on the bench
zoo, docs/benchmarks.md). Each covers a trigger family the others miss: a small patch (Neural Cleanse,
DF-TND), a faint whole-image key (blend), a warp (warp). DL-TND's flags are reported (agreement in the
rule and the report) but decide only when it runs alone: letting it corroborate the others called clean
models backdoored while catching no backdoor they missed.
"""

from __future__ import annotations

import datetime as _dt
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.errors import InputError
from guard.model import feature_layer, fingerprint, validate_labels
from guard.model import num_classes as count_classes
from guard.profile import Profile
from guard.scan.blend import BlendReversal
from guard.scan.neural_cleanse import NeuralCleanse, validate_max_rounds
from guard.scan.tnd import DFTND, DLTND, infer_input_shape
from guard.scan.warp import WarpReversal
from guard.stats import anomaly_index

METHODS = {"nc": "neural_cleanse", "dl-tnd": "dl_tnd", "df-tnd": "df_tnd", "blend": "blend", "warp": "warp"}
NEEDS_DATA = ("nc", "dl-tnd", "blend", "warp")
DECISIVE = ("neural_cleanse", "df_tnd", "blend", "warp")  # calibrated on clean models: their flag alone decides
NC_MIN_IMAGES = 20


def neural_cleanse(*, seed: int = 0, device: str = "cpu", max_rounds: int | None = None,
                   progress: bool | None = None) -> NeuralCleanse | None:
    """The audit's Neural Cleanse where a caller changes its device or budget (``--device``, ``--max-rounds``),
    else None (:func:`run_audit` builds the default one). InputError for a budget under one round."""
    validate_max_rounds(max_rounds)
    if device == "cpu" and max_rounds is None:
        return None
    budget = {} if max_rounds is None else {"max_rounds": max_rounds}
    return NeuralCleanse(seed=seed, device=device, progress=progress, **budget)


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"nc,dl-tnd"`` -> ``["nc", "dl-tnd"]`` in canonical order; unknown names are an input error."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise InputError(f"--methods takes a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return [m for m in METHODS if m in names]


@dataclass
class AuditResult:
    """What an audit found: ``summary`` (JSON-ready, the body of report.json) and ``arrays``
    (masks and patterns per method, for the report's images)."""

    summary: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.summary["verdict"]

    @property
    def suspect_labels(self) -> list[int]:
        return list(self.summary["suspect_labels"])

    @property
    def exit_code(self) -> int:
        """The CLI contract: 0 clean, 1 backdoor suspected."""
        return 1 if self.verdict == "backdoored" else 0

    def to_json(self) -> dict[str, Any]:
        return self.summary


def combine(flags: dict[str, list[int]]) -> tuple[str, list[int], str]:
    """Verdict, suspect labels and the rule that fired, from each method's flagged labels.

    The calibrated methods (:data:`DECISIVE`: Neural Cleanse with its isolation bar, DF-TND, the blend
    and the warp reversal, whose bars were set on clean and backdoored models) decide; DL-TND only alone.
    Its flags are otherwise reported as agreement or disagreement.
    """
    if len(flags) == 1:
        (name, labels), = flags.items()
        return ("backdoored", sorted(set(labels)), f"{name} flagged (the only method run)") if labels else \
            ("clean", [], f"{name} flagged nothing (the only method run)")
    dl = sorted(set(flags.get("dl_tnd") or []))
    decisive = [m for m in DECISIVE if flags.get(m)]
    if decisive:
        labels = sorted(set().union(*(flags[m] for m in decisive)))
        agree = "dl_tnd agrees" if set(dl) & set(labels) else ""
        return "backdoored", labels, " and ".join(f"{m} flagged" for m in decisive) + (f" ({agree})" if agree else "")
    if dl:
        return "clean", [], f"only dl_tnd {dl} flagged, without a calibrated method (reported, not decisive)"
    return "clean", [], "no method flagged"


def agreement(flags: dict[str, list[int]], num_classes: int) -> dict[str, Any]:
    """Per label, which methods flagged it; per pair of methods, whether their model verdicts agree."""
    per_label = {str(k): sorted(m for m, labs in flags.items() if k in labs) for k in range(num_classes)}
    names = sorted(flags)
    pairs = {f"{a}~{b}": bool(flags[a]) == bool(flags[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return {"per_label": {k: v for k, v in per_label.items() if v}, "model_verdicts_agree": pairs,
            "all_agree": len({bool(v) for v in flags.values()}) <= 1}


def _require_data(methods: Sequence[str], x: np.ndarray | None, *, nc_from_profile: bool) -> list[str]:
    """The methods that need clean data (Neural Cleanse not, when its scan comes from the profile);
    an input error when they have none."""
    need = [m for m in methods if m in NEEDS_DATA and not (m == "nc" and nc_from_profile)]
    if x is None and need:
        raise InputError(f"{', '.join(need)} need clean data: pass --data CLEAN.npz, or run "
                         f"--methods df-tnd for a data-free audit")
    return need


def validate(model: nn.Module, x: np.ndarray | None, y: np.ndarray | None, methods: list[str], *,
             num_classes: int, dl: DLTND | None = None, nc_from_profile: bool = False) -> None:
    """Refuse input the selected methods cannot use, before any optimisation starts."""
    need = _require_data(methods, x, nc_from_profile=nc_from_profile)
    validate_labels(y, num_classes)
    if x is not None and "nc" in need and len(x) < NC_MIN_IMAGES:
        raise InputError(f"Neural Cleanse needs at least {NC_MIN_IMAGES} clean images, got {len(x)}")
    if "dl-tnd" in methods:
        if y is None:
            raise InputError("DL-TND needs labelled clean data (an array 'y' in the .npz)")
        dl = dl or DLTND()
        counts = np.bincount(y, minlength=num_classes)
        short = [int(c) for c in np.flatnonzero(counts < dl.min_samples_per_class)]
        if short:
            raise InputError(f"DL-TND needs at least {dl.min_samples_per_class} clean images of every class; "
                             f"class(es) {short[:10]} have {[int(counts[c]) for c in short[:10]]}")


def _nc_block(nc: NeuralCleanse) -> dict[str, Any]:
    return {"method": "Neural Cleanse", "statistic": "L1 norm of the reversed mask; MAD anomaly index (raw "
            "and log scale)", "threshold": nc.threshold_, "isolation": nc.isolation, "per_label": nc.per_label(),
            "suspect_labels": list(nc.suspect_labels_), "decision": "backdoored" if nc.suspect_labels_ else "clean",
            "steps": int(nc.steps_), "seconds": round(float(nc.seconds_), 2), "source": "scan",
            "hyperparameters": {"early_stop_patience": nc.early_stop_patience, "max_rounds": nc.max_rounds,
                                "batch_size": nc.batch_size, "seed": nc.seed}}


def _nc_from_profile(profile: Profile) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    scan = profile.meta.get("scan") or {}
    per_label = scan.get("per_label")
    if not per_label or "all_masks" not in profile.tensors:
        raise InputError("the profile holds no per-label Neural Cleanse results to reuse; drop --profile")
    sus = list(profile.suspect_labels)
    block = {"method": "Neural Cleanse", "statistic": "L1 norm of the reversed mask; MAD anomaly index (raw "
             "and log scale)", "threshold": scan.get("threshold", 2.0), "per_label": per_label,
             "suspect_labels": sus, "decision": "backdoored" if sus else "clean", "steps": scan.get("steps"),
             "seconds": scan.get("seconds"), "source": "profile"}
    return block, profile.tensors["all_masks"], profile.tensors["all_patterns"]


def run_audit(model: nn.Module, x: np.ndarray | None = None, y: np.ndarray | None = None, *,
              methods: Sequence[str] = tuple(METHODS), seed: int = 0,
              profile: Profile | None = None, layer: str | None = None, source: dict[str, Any] | None = None,
              nc: NeuralCleanse | None = None, dl_tnd: DLTND | None = None, df_tnd: DFTND | None = None,
              blend: BlendReversal | None = None, warp: WarpReversal | None = None,
              nc_max_images: int = 500, input_shape: Sequence[int] | None = None,
              progress: bool | None = None) -> AuditResult:
    """Audit ``model`` with the chosen methods on clean ``(x, y)`` (``x`` may be None for DF-TND alone).

    Estimator instances may be passed to change hyperparameters; by default each is seeded with
    ``seed``. A ``profile`` (already checked against the model by the caller) supplies the Neural
    Cleanse results instead of a new scan, and the warp reversal's when ``guard scan`` stored them.
    """
    t0 = time.perf_counter()
    methods = parse_methods(list(methods))
    model.eval()
    layer_name, _ = feature_layer(model, layer)
    sha = fingerprint(model)
    if x is not None:
        shape = tuple(int(s) for s in x.shape[1:])
    elif input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    else:
        shape = tuple(profile.input_shape) if profile is not None else ()
    _require_data(methods, x, nc_from_profile=profile is not None)  # before probing the model's shape
    shape_probed = not shape
    if shape_probed:  # data-free and no shape given: probe the model (InputError when it cannot be told)
        shape = infer_input_shape(model)
    num_classes = count_classes(model, shape)
    validate(model, x, y, methods, num_classes=num_classes, dl=dl_tnd, nc_from_profile=profile is not None)
    blocks: dict[str, dict[str, Any]] = {}
    arrays: dict[str, np.ndarray] = {}
    flags: dict[str, list[int]] = {}
    timings: dict[str, float] = {}
    if "nc" in methods:
        t = time.perf_counter()
        if profile is not None:
            block, masks, patterns = _nc_from_profile(profile)
        else:
            nc = nc or NeuralCleanse(seed=seed, progress=progress)
            xs = x
            if len(x) > nc_max_images:  # the batched optimiser samples batches; more images add nothing
                idx = np.random.default_rng(seed).choice(len(x), nc_max_images, replace=False)
                xs = x[np.sort(idx)]
            nc.fit(model, xs, num_classes=num_classes)
            block, masks, patterns = _nc_block(nc), nc.masks_, nc.patterns_
        arrays["neural_cleanse.masks"], arrays["neural_cleanse.patterns"] = masks, patterns
        blocks["neural_cleanse"] = block
        flags["neural_cleanse"] = list(block["suspect_labels"])
        timings["neural_cleanse"] = round(time.perf_counter() - t, 2)
    if "dl-tnd" in methods:
        t = time.perf_counter()
        dl = dl_tnd or DLTND(seed=seed, progress=progress)
        dl.fit(model, x, y, num_classes=num_classes)
        blocks["dl_tnd"] = {"method": "DL-TND", "statistic": f"{dl.quantile:.0%} quantile of the cosine "
                            "similarity between universal and per-image perturbed logits",
                            "threshold": dl.threshold, "quantile": dl.quantile,
                            "anomaly_index": [round(float(v), 4) for v in -anomaly_index(dl.score_)],
                            "per_label": dl.per_label(), "suspect_labels": list(dl.suspect_labels_),
                            "decision": "backdoored" if dl.suspect_labels_ else "clean",
                            "samples_per_class": dl.samples_per_class_, "steps": dl.steps_,
                            "seconds": round(dl.seconds_, 2)}
        arrays["dl_tnd.masks"], arrays["dl_tnd.patterns"] = dl.masks_, dl.patterns_
        flags["dl_tnd"] = list(dl.suspect_labels_)
        timings["dl_tnd"] = round(time.perf_counter() - t, 2)
    if "df-tnd" in methods:
        t = time.perf_counter()
        df = df_tnd or DFTND(seed=seed, layer=layer_name, progress=progress)
        df.fit(model, shape, num_classes=num_classes)
        blocks["df_tnd"] = {"method": "DF-TND", "statistic": "mean logit increase of the recovered images "
                            "over their noise seeds; the top label's dominance (its increase over the "
                            "runner-up's) against the threshold; MAD anomaly index reported",
                            "threshold": df.threshold, "min_increase": df.min_increase,
                            "per_label": df.per_label(), "suspect_labels": list(df.suspect_labels_),
                            "decision": "backdoored" if df.suspect_labels_ else "clean", "seeds": df.n_seeds,
                            "top_neurons": [int(v) for v in df.top_neurons_], "steps": df.steps_,
                            "seconds": round(df.seconds_, 2)}
        arrays["df_tnd.mask"], arrays["df_tnd.pattern"] = df.mask_, df.pattern_
        flags["df_tnd"] = list(df.suspect_labels_)
        timings["df_tnd"] = round(time.perf_counter() - t, 2)
    reversals = {"blend": (blend or BlendReversal(seed=seed, progress=progress), "Blend reversal",
                           "opacity its reversed whole-image pattern", "patterns_", "patterns"),
                 "warp": (warp or WarpReversal(seed=seed, progress=progress), "Warp reversal",
                          "displacement its reversed smooth warp", "fields_", "fields")}
    for name, (est, title, need, learned, array) in reversals.items():
        if name not in methods:
            continue
        t = time.perf_counter()
        stored = profile.warp if name == "warp" and profile is not None else None
        if stored is not None:  # guard scan ran the warp reversal and kept its result in the profile
            fit = {"threshold": stored.threshold, "per_label": stored.per_label,
                   "suspect_labels": list(stored.suspect_labels), "strengths": list(stored.strengths),
                   "grid": stored.grid, "steps": stored.steps, "seconds": stored.seconds, "source": "profile"}
            success, found = stored.success, profile.tensors["warp.fields"]
        else:
            est.fit(model, x, y, num_classes=num_classes)
            fit = {"threshold": est.threshold, "per_label": est.per_label(),
                   "suspect_labels": list(est.suspect_labels_), **_grid(est), "steps": est.steps_,
                   "seconds": round(est.seconds_, 2), "source": "scan"}
            success, found = est.success, getattr(est, learned)
        blocks[name] = {"method": title, "statistic": f"each label's lead: 1 - the {need} needs for "
                        f"{success:.0%} attack success over what the easiest other label needs",
                        "decision": "backdoored" if fit["suspect_labels"] else "clean", **fit}
        arrays[f"{name}.{array}"] = found
        flags[name] = list(fit["suspect_labels"])
        timings[name] = round(time.perf_counter() - t, 2)
    verdict, suspects, rule = combine(flags)
    timings["total"] = round(time.perf_counter() - t0, 2)
    summary: dict[str, Any] = {
        "verdict": verdict,
        "suspect_labels": suspects,
        "rule": rule,
        "methods": [METHODS[m] for m in methods],
        "model_sha256": sha,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "input_shape_probed": shape_probed,
        "feature_layer": layer_name,
        "data": {"source": (source or {}).get("data"), "images": 0 if x is None else int(len(x)),
                 "per_class": None if y is None else np.bincount(y, minlength=num_classes).tolist(),
                 "data_free": x is None},
        "source": source or {},
        "seed": seed,
        "agreement": agreement(flags, num_classes),
        "timings": timings,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
        **blocks,
    }
    return AuditResult(summary=summary, arrays=arrays)


def _grid(est: BlendReversal | WarpReversal) -> dict[str, Any]:
    """The grid a reversal's success curve was read on, as its audit block records it."""
    if isinstance(est, WarpReversal):
        return {"strengths": [float(v) for v in est.strengths], "grid": int(est.grid)}
    return {"alphas": [float(a) for a in est.alphas]}


def anomaly_indices(summary: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Per method, ``(label, anomaly index)``: NC's MAD index of L1 norms (the larger of raw and log
    scale), DL-TND's upper MAD index of the similarity score, DF-TND's of the logit increase (the blend
    reversal has none: its statistic is the lead)."""
    out: dict[str, list[tuple[int, float]]] = {}
    if "neural_cleanse" in summary:
        out["neural_cleanse"] = [(int(r["label"]), float(max(r["anomaly_index"], r.get("log_anomaly_index",
                                  r["anomaly_index"])))) for r in summary["neural_cleanse"]["per_label"]]
    if "dl_tnd" in summary:
        out["dl_tnd"] = [(int(r["label"]), float(a)) for r, a in
                         zip(summary["dl_tnd"]["per_label"], summary["dl_tnd"]["anomaly_index"])]
    if "df_tnd" in summary:
        out["df_tnd"] = [(int(r["label"]), float(r["anomaly_index"])) for r in summary["df_tnd"]["per_label"]]
    return out


def write_metrics(result: AuditResult, path: str | Path) -> Path:
    """Write the audit as Prometheus text exposition for node_exporter's textfile collector.

    Series: ``guard_audit_verdict`` (1 backdoored, 0 clean), ``guard_audit_anomaly_index{method,label}``,
    ``guard_audit_suspect{method,label}``, ``guard_audit_blend_lead{label}`` and
    ``guard_audit_warp_lead{label}`` (the blend and warp reversals' statistic),
    ``guard_audit_duration_seconds`` (whole audit) and
    ``guard_audit_method_duration_seconds{method}``, ``guard_audit_last_run_timestamp_seconds``; every
    series carries ``model`` (the first 16 hex digits of the model's SHA-256). The write is atomic
    (``write_to_textfile`` renames a temporary file), so the collector never reads half a file.
    """
    from prometheus_client import write_to_textfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), _registry(result))
    return path


def metrics_text(result: AuditResult) -> str:
    """The series of :func:`write_metrics` as Prometheus text exposition (what a fleet audit's worker sends back)."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(result)).decode()


def _registry(result: AuditResult):
    """A registry holding the audit's series (see :func:`write_metrics`)."""
    from prometheus_client import CollectorRegistry, Gauge

    s = result.summary
    reg = CollectorRegistry()
    model = s["model_sha256"][:16]
    Gauge("guard_audit_verdict", "Audit verdict: 1 backdoor suspected, 0 clean", ["model"],
          registry=reg).labels(model).set(1 if s["verdict"] == "backdoored" else 0)
    ai = Gauge("guard_audit_anomaly_index", "Per-label anomaly index of each audit method (higher = more "
               "suspect)", ["model", "method", "label"], registry=reg)
    sus = Gauge("guard_audit_suspect", "1 where the method flagged the label", ["model", "method", "label"],
                registry=reg)
    for method, rows in anomaly_indices(s).items():
        for label, value in rows:
            ai.labels(model, method, str(label)).set(value)
    for method in METHODS.values():
        if method in s:
            flagged = set(s[method]["suspect_labels"])
            for r in s[method]["per_label"]:
                sus.labels(model, method, str(r["label"])).set(1 if r["label"] in flagged else 0)
    if "blend" in s:
        lead = Gauge("guard_audit_blend_lead", "Blend reversal: share of opacity a label's whole-image trigger "
                     "saves over the easiest other label's (higher = more suspect)", ["model", "label"], registry=reg)
        for r in s["blend"]["per_label"]:
            lead.labels(model, str(r["label"])).set(r["lead"])
    if "warp" in s:
        lead = Gauge("guard_audit_warp_lead", "Warp reversal: share of displacement a label's smooth warp "
                     "saves over the easiest other label's (higher = more suspect)", ["model", "label"], registry=reg)
        for r in s["warp"]["per_label"]:
            lead.labels(model, str(r["label"])).set(r["lead"])
    Gauge("guard_audit_duration_seconds", "Wall-clock seconds of the whole audit", ["model"],
          registry=reg).labels(model).set(s["timings"]["total"])
    md = Gauge("guard_audit_method_duration_seconds", "Wall-clock seconds per audit method", ["model", "method"],
               registry=reg)
    for method, secs in s["timings"].items():
        if method != "total":
            md.labels(model, method).set(secs)
    Gauge("guard_audit_last_run_timestamp_seconds", "Unix time the audit finished", ["model"],
          registry=reg).labels(model).set(time.time())
    return reg
