"""The profile: what the offline scan learned, bound to one model by its SHA-256.

A profile is a directory with ``profile.json`` (schema version, model fingerprint, input shape,
classes, feature and inner layer, per-label scan results, suspect labels, each check's threshold and
the FPR they were calibrated for, the ensemble, policy, repair settings) and ``tensors.safetensors``
(masks, patterns, the checks' and the ensemble's fitted arrays). :class:`Profile` is the typed form
of both; ``profile.json`` is validated field by field on load (:class:`~guard.errors.ProfileError`
names the bad field). Writes are atomic (a temporary sibling directory renamed into place); loads
verify schema and hash and refuse a mismatch rather than guarding a model with another model's
thresholds. Profiles of schema version 1 are migrated on load (in memory; saving writes version 2).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from guard.errors import ProfileError, ProfileMismatch

SCHEMA_VERSION = 2
MIGRATES_FROM = (1,)
"""Older schema versions :meth:`Profile.load` migrates in memory."""
JSON_NAME = "profile.json"
TENSORS_NAME = "tensors.safetensors"
MODES = ("enforce", "repair", "shadow")


@dataclass
class LabelScan:
    """One label's trigger-reversal result."""

    label: int
    l1_norm: float
    anomaly_index: float
    log_anomaly_index: float
    suspect: bool
    attack_success: float | None = None
    converged: bool | None = None
    isolation: float | None = None  # L1 norm over the cheapest natural label's (None: no such label)


@dataclass
class Scan:
    """How the scan ran and what it found per label."""

    method: str
    threshold: float
    per_label: list[LabelScan]
    seed: int | None = None
    steps: int | None = None
    seconds: float | None = None
    samples: dict[str, int] = field(default_factory=dict)


@dataclass
class CheckEntry:
    """A calibrated check: its threshold (at the profile's ``fpr``) and its scalar settings; its arrays
    are the tensors ``check.NAME.*``."""

    threshold: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnsembleEntry:
    """The decision rule: ``method`` (a name in :data:`guard.online.ensemble.RULES`), its threshold on
    the combined statistic (at the profile's ``fpr``) and settings; its arrays are ``ensemble.*``."""

    method: str
    threshold: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Policy:
    mode: str = "enforce"


@dataclass
class RepairSettings:
    pixels: int = 16


@dataclass
class Calibration:
    samples: int
    realised_fpr: float


@dataclass
class Profile:
    """A scanned model's profile: typed metadata plus named numpy arrays (``tensors``).

    ``checks`` is ordered (the guard's score columns); ``fpr`` is the one false-positive rate every
    threshold was calibrated for; ``ensemble`` is None for a profile from before the ensemble (the
    guard then decides with any check over its own threshold).

    >>> import numpy as np
    >>> p = Profile(model_sha256="0" * 64, input_shape=(1, 4, 4), num_classes=2, feature_layer="fc",
    ...             fpr=0.01, checks={"feature": CheckEntry(threshold=3.5)},
    ...             tensors={"check.feature.whiten": np.eye(2, dtype=np.float32)})
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     q = Profile.load(p.save(pathlib.Path(d) / "prof"), model_sha256="0" * 64)
    >>> q.checks["feature"].threshold, q.fpr, q.input_shape
    (3.5, 0.01, (1, 4, 4))
    """

    model_sha256: str
    input_shape: tuple[int, ...]
    num_classes: int
    feature_layer: str
    fpr: float
    checks: dict[str, CheckEntry]
    inner_layer: str | None = None
    ensemble: EnsembleEntry | None = None
    policy: Policy = field(default_factory=Policy)
    repair: RepairSettings = field(default_factory=RepairSettings)
    scan: Scan | None = None
    suspect_labels: list[int] = field(default_factory=list)
    suspect_neurons: dict[str, list[int]] = field(default_factory=dict)
    calibration: Calibration | None = None
    created: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    checks_off: dict[str, str] = field(default_factory=dict)
    """Checks the scan left out, each with the reason (e.g. ``consistency`` on a token model)."""
    memory: dict[str, Any] | None = None
    """The opt-in trigger memory's calibrated settings (:meth:`guard.online.memory.TriggerMemory.to_settings`);
    None when the scan did not add it."""
    tensors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ state of checks and ensemble
    def add_check(self, name: str, settings: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Store a check's :meth:`~guard.online.checks.Check.to_profile` output (appended in order)."""
        s = dict(settings)
        self.checks[name] = CheckEntry(threshold=float(s.pop("threshold")), settings=s)
        self.tensors.update({f"check.{name}.{k}": v for k, v in tensors.items()})

    def check_state(self, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(settings with threshold, tensors)`` of check ``name``, as its ``from_profile`` takes them."""
        e = self.checks[name]
        return {**e.settings, "threshold": e.threshold}, self._under(f"check.{name}.")

    def set_ensemble(self, settings: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        s = dict(settings)
        self.ensemble = EnsembleEntry(method=str(s.pop("method")), threshold=float(s.pop("threshold")), settings=s)
        self.tensors.update({f"ensemble.{k}": v for k, v in tensors.items()})

    def ensemble_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.ensemble is None:
            raise ProfileError("the profile has no ensemble")
        e = self.ensemble
        return {**e.settings, "method": e.method, "threshold": e.threshold}, self._under("ensemble.")

    def _under(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """``profile.json``'s content."""
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "model_sha256": self.model_sha256,
                               "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                               "feature_layer": self.feature_layer, "inner_layer": self.inner_layer,
                               "created": self.created, "source": self.source, "checks_off": dict(self.checks_off),
                               "scan": None if self.scan is None else asdict(self.scan),
                               "suspect_labels": list(self.suspect_labels), "suspect_neurons": self.suspect_neurons,
                               "fpr": self.fpr,
                               "checks": {n: {"threshold": e.threshold, **e.settings} for n, e in self.checks.items()},
                               "ensemble": None if self.ensemble is None else
                               {"method": self.ensemble.method, "threshold": self.ensemble.threshold,
                                **self.ensemble.settings},
                               "calibration": None if self.calibration is None else asdict(self.calibration),
                               "policy": asdict(self.policy), "repair": asdict(self.repair),
                               "tensor_names": sorted(self.tensors)}
        if self.memory is not None:  # absent, not null, when off: profiles without it stay as they were
            out["memory"] = dict(self.memory)
        return out

    @property
    def meta(self) -> dict[str, Any]:
        """Read-only JSON view of the metadata (:meth:`to_json`); edit the typed fields instead."""
        return self.to_json()

    @classmethod
    def from_json(cls, meta: Any, tensors: dict[str, np.ndarray] | None = None, *, where: str = JSON_NAME) -> Profile:
        """Validate ``profile.json``'s content (current schema) and build the profile."""
        v = _Validator(where)
        m = v.obj(meta, "")
        ver = m.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise ProfileMismatch(f"{where}: schema_version {ver!r} is not {SCHEMA_VERSION}: "
                                  "rescan the model with this guard")
        sha = v.str(m, "model_sha256")
        if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
            raise ProfileError(f"{where}: model_sha256 must be 64 lowercase hex digits")
        shape = v.list(m, "input_shape", v.int_item)
        if len(shape) != 3 or min(shape) < 1:
            raise ProfileError(f"{where}: input_shape must be three positive integers (C, H, W)")
        fpr = v.num(m, "fpr")
        if not 0 < fpr < 0.5:
            raise ProfileError(f"{where}: fpr must be in (0, 0.5), got {fpr}")
        checks = {}
        for name, entry in v.obj(m.get("checks"), "checks").items():
            e = v.obj(entry, f"checks.{name}")
            checks[name] = CheckEntry(threshold=v.num(e, "threshold", f"checks.{name}."),
                                      settings={k: x for k, x in e.items() if k != "threshold"})
        if not checks:
            raise ProfileError(f"{where}: checks must name at least one calibrated check")
        ensemble = None
        if m.get("ensemble") is not None:
            e = v.obj(m["ensemble"], "ensemble")
            ensemble = EnsembleEntry(method=v.str(e, "method", "ensemble."),
                                     threshold=v.num(e, "threshold", "ensemble."),
                                     settings={k: x for k, x in e.items() if k not in ("method", "threshold")})
        policy = v.obj(m.get("policy", {}), "policy")
        mode = policy.get("mode", "enforce")
        if mode not in MODES:
            raise ProfileError(f"{where}: policy.mode must be one of {', '.join(MODES)}, got {mode!r}")
        repair = v.obj(m.get("repair", {}), "repair")
        pixels = v.int(repair, "pixels", "repair.") if "pixels" in repair else 16
        scan = None
        if m.get("scan") is not None:
            s = v.obj(m["scan"], "scan")
            per_label = []
            for i, r in enumerate(v.list(s, "per_label", None, "scan.")):
                r = v.obj(r, f"scan.per_label[{i}]")
                p = f"scan.per_label[{i}]."
                per_label.append(LabelScan(
                    label=v.int(r, "label", p), l1_norm=v.num(r, "l1_norm", p),
                    anomaly_index=v.num(r, "anomaly_index", p),
                    log_anomaly_index=v.num(r, "log_anomaly_index", p), suspect=v.bool(r, "suspect", p),
                    attack_success=v.num(r, "attack_success", p) if r.get("attack_success") is not None else None,
                    converged=v.bool(r, "converged", p) if r.get("converged") is not None else None,
                    isolation=v.num(r, "isolation", p) if r.get("isolation") is not None else None))
            scan = Scan(method=v.str(s, "method", "scan."), threshold=v.num(s, "threshold", "scan."),
                        per_label=per_label,
                        seed=s.get("seed"), steps=s.get("steps"), seconds=s.get("seconds"),
                        samples=dict(s.get("samples") or {}))
        calibration = None
        if m.get("calibration") is not None:
            c = v.obj(m["calibration"], "calibration")
            calibration = Calibration(samples=v.int(c, "samples", "calibration."),
                                      realised_fpr=v.num(c, "realised_fpr", "calibration."))
        layer = v.str(m, "feature_layer")
        inner = m.get("inner_layer")
        if inner is not None and not isinstance(inner, str):
            raise ProfileError(f"{where}: inner_layer must be a string or null")
        memory = None
        if m.get("memory") is not None:
            e = v.obj(m["memory"], "memory")
            known = ("size", "n_features", "duplicate", "seed", "threshold", "fpr")
            unknown = sorted(set(e) - set(known))
            if unknown:
                raise ProfileError(f"{where}: memory has unknown field(s) {', '.join(unknown)}")
            memory = {k: (v.int if k in ("size", "n_features", "seed") else v.num)(e, k, "memory.") for k in known}
            if memory["size"] < 1 or memory["n_features"] < 1 or not 0 < memory["fpr"] < 0.5:
                raise ProfileError(f"{where}: memory needs size and n_features >= 1 and fpr in (0, 0.5)")
        off = v.obj(m.get("checks_off", {}), "checks_off")
        if not all(isinstance(r, str) for r in off.values()):
            raise ProfileError(f"{where}: checks_off must map check names to reasons (strings)")
        return cls(model_sha256=sha, input_shape=tuple(shape), num_classes=v.int(m, "num_classes"),
                   feature_layer=layer, inner_layer=inner, fpr=fpr, checks=checks, ensemble=ensemble,
                   policy=Policy(mode=mode), repair=RepairSettings(pixels=pixels), scan=scan,
                   suspect_labels=v.list(m, "suspect_labels", v.int_item) if "suspect_labels" in m else [],
                   suspect_neurons={str(k): list(x)
                                    for k, x in v.obj(m.get("suspect_neurons", {}), "suspect_neurons").items()},
                   calibration=calibration, created=m.get("created"), source=dict(m.get("source") or {}),
                   checks_off={str(k): r for k, r in off.items()}, memory=memory,
                   tensors=dict(tensors or {}))

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write atomically to ``directory`` (replacing an existing profile there)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        meta = self.to_json()
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (tmp / JSON_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, str(tmp / TENSORS_NAME))
            for f in (JSON_NAME, TENSORS_NAME):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            if directory.exists():
                old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
                os.rename(directory, old)
                os.rename(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, model_sha256: str | None = None) -> Profile:
        """Read a profile; with ``model_sha256`` refuse one built for another model (exit code 3)."""
        directory = Path(directory)
        jpath, tpath = directory / JSON_NAME, directory / TENSORS_NAME
        if not directory.is_dir():
            raise ProfileError(f"profile directory not found: {directory}")
        if not jpath.is_file() or not tpath.is_file():
            raise ProfileError(f"{directory} is not a guard profile (needs {JSON_NAME} and {TENSORS_NAME})")
        try:
            meta = json.loads(jpath.read_text())
        except (OSError, ValueError) as e:
            raise ProfileError(f"{jpath} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or "model_sha256" not in meta or "input_shape" not in meta:
            raise ProfileError(f"{jpath} lacks model_sha256 or input_shape")
        ver = meta.get("schema_version")
        if ver != SCHEMA_VERSION and ver not in MIGRATES_FROM:
            raise ProfileMismatch(f"profile schema_version {ver!r} is not {SCHEMA_VERSION}: "
                                  f"rescan the model with this guard")
        if model_sha256 is not None and meta["model_sha256"] != model_sha256:
            raise ProfileMismatch(f"profile was built for model {str(meta['model_sha256'])[:12]}…, "
                                  f"this model is {model_sha256[:12]}…: rescan it")
        try:
            tensors = dict(load_file(str(tpath)))
        except Exception as e:
            raise ProfileError(f"{tpath} is unreadable or truncated: {e}") from e
        names = meta.get("tensor_names", [])
        missing = [k for k in names if k not in tensors] if isinstance(names, list) else []
        if missing:
            raise ProfileError(f"{tpath} lacks tensors {missing}")
        if ver == 1:
            meta, tensors = _migrate_v1(meta, tensors)
        return cls.from_json(meta, tensors, where=str(jpath))


def _migrate_v1(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Schema 1 to 2: one ``fpr`` (not one per check and ensemble), checks in scoring order (schema 1
    kept it in ``ensemble.checks``), the knn check's ``k`` a setting, not a tensor, and its single
    bank of profiles from before the class-conditional bank shared by every class."""
    meta, tensors = dict(meta), dict(tensors)
    checks = meta.get("checks")
    if not isinstance(checks, dict):
        raise ProfileError(f"{JSON_NAME}: checks must be an object")
    ens = meta.get("ensemble")
    order = list(ens.get("checks") or checks) if isinstance(ens, dict) else list(checks)
    if sorted(order) != sorted(checks):
        raise ProfileError(f"{JSON_NAME}: the profile's ensemble does not cover its checks: rescan the model")
    if "fpr" not in meta:
        meta["fpr"] = next((c.get("fpr") for c in checks.values() if isinstance(c, dict)), None)
    new_checks = {}
    for name in order:
        entry = {k: v for k, v in dict(checks[name]).items() if k != "fpr"}
        if name == "knn":
            if "check.knn.k" in tensors:
                entry["k"] = int(np.asarray(tensors.pop("check.knn.k")).reshape(-1)[0])
            if "check.knn.bank" in tensors:  # one bank (D, M) for every class
                bank = np.ascontiguousarray(tensors.pop("check.knn.bank").T)
                k = int(meta.get("num_classes") or 1)
                tensors["check.knn.bank_rows"] = bank
                tensors["check.knn.starts"] = np.zeros(k, np.int64)
                tensors["check.knn.stops"] = np.full(k, len(bank), np.int64)
        new_checks[name] = entry
    meta["checks"] = new_checks
    if isinstance(ens, dict):
        meta["ensemble"] = {k: v for k, v in ens.items() if k not in ("checks", "fpr")}
    meta["schema_version"] = SCHEMA_VERSION
    return meta, tensors


class _Validator:
    """Typed reads of ``profile.json`` fields that raise :class:`ProfileError` naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, what: str):
        raise ProfileError(f"{self.where}: {path} must be {what}")

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path or "the top level", "an object")
        return value

    def num(self, m: dict, key: str, prefix: str = "") -> float:
        x = m.get(key)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            self.fail(prefix + key, "a number")
        return float(x)

    def int(self, m: dict, key: str, prefix: str = "") -> int:
        x = m.get(key)
        if isinstance(x, bool) or not isinstance(x, int):
            self.fail(prefix + key, "an integer")
        return x

    def int_item(self, x: Any, path: str) -> int:
        if isinstance(x, bool) or not isinstance(x, int):
            self.fail(path, "an integer")
        return x

    def bool(self, m: dict, key: str, prefix: str = "") -> bool:
        x = m.get(key)
        if not isinstance(x, bool):
            self.fail(prefix + key, "true or false")
        return x

    def str(self, m: dict, key: str, prefix: str = "") -> str:
        x = m.get(key)
        if not isinstance(x, str) or not x:
            self.fail(prefix + key, "a non-empty string")
        return x

    def list(self, m: dict, key: str, item=None, prefix: str = "") -> list:
        x = m.get(key)
        if not isinstance(x, list):
            self.fail(prefix + key, "a list")
        return [item(v, f"{prefix}{key}[{i}]") for i, v in enumerate(x)] if item else x
