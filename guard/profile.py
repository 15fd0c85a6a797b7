"""The profile: what the offline scan learned, bound to one model by its SHA-256.

A profile is a directory with ``profile.json`` (schema version, model fingerprint, input shape,
classes, feature and inner layer, per-label scan results, suspect labels, each check's threshold and
the FPR they were calibrated for, the ensemble, policy, repair settings) and ``tensors.safetensors``
(masks, patterns, the checks' and the ensemble's fitted arrays). :class:`Profile` is the typed form
of both; ``profile.json`` is validated on load against its schema, declared once: the dataclasses below,
each field's rule (a range, a format) in its ``Annotated`` type, read by pydantic (plain construction checks
nothing). A bad, unknown or misspelled field is a :class:`~guard.errors.ProfileError` naming the file and
the field path. Writes are atomic (a temporary sibling directory renamed into place); loads verify schema
and hash and refuse a mismatch rather than guarding a model with another model's thresholds. Profiles of
schema version 1 are migrated on load (in memory; saving writes version 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from safetensors.numpy import load_file, save_file

from guard.errors import ProfileError, ProfileMismatch
from guard.modes import MODES

SCHEMA_VERSION = 2
MIGRATES_FROM = (1,)
"""Older schema versions :meth:`Profile.load` migrates in memory."""
JSON_NAME = "profile.json"
TENSORS_NAME = "tensors.safetensors"

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""How ``profile.json``'s sections are read (each dataclass's ``__pydantic_config__``): an unknown (or
misspelled) field is refused, and values are taken as JSON typed them (no ``"3"`` for 3, no ``1`` for true,
no NaN or infinity; an integer is a valid number)."""


def _rule(test: Callable[[Any], Any], what: str) -> AfterValidator:
    """A check the types cannot say (a range, a format), applied when ``profile.json`` is read; it fails as
    ``PATH what`` (``{!r}`` in ``what`` stands for the value)."""

    def check(value: Any) -> Any:
        if not test(value):  # a JSON array read as a tuple shows as the list it was
            raise ValueError(what.format(list(value) if isinstance(value, tuple) else value))
        return value

    return AfterValidator(check)


_Name = Annotated[str, Field(min_length=1)]
_Fpr = Annotated[float, _rule(lambda f: 0 < f < 0.5, "must be in (0, 0.5), got {!r}")]
_Positive = Annotated[int, _rule(lambda n: n >= 1, "must be >= 1, got {!r}")]
_Mode = Annotated[str, _rule(lambda m: m in MODES, f"must be one of {', '.join(MODES)}, got {{!r}}")]
_Sha256 = Annotated[str, _rule(lambda s: re.fullmatch("[0-9a-f]{64}", s), "must be 64 lowercase hex digits")]
_Shape = Annotated[tuple[int, ...], _rule(lambda s: len(s) == 3 and min(s) >= 1,
                                          "must be three positive integers (C, H, W), got {!r}")]


@dataclass
class LabelScan:
    """One label's trigger-reversal result."""

    __pydantic_config__ = _STRICT
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

    __pydantic_config__ = _STRICT
    method: _Name
    threshold: float
    per_label: list[LabelScan]
    seed: int | None = None
    steps: int | None = None
    seconds: float | None = None
    samples: dict[str, int] = field(default_factory=dict)


@dataclass
class WarpScan:
    """The warp reversal's result as ``guard scan`` stores it (:meth:`guard.scan.warp.WarpReversal.to_profile`):
    its bar on the lead, the labels over it, one record per label, the strength grid it read the success
    curves on and how it ran; the reversed fields are the tensor ``warp.fields``. ``guard audit --profile``
    reuses it instead of reversing the warps again."""

    __pydantic_config__ = _STRICT
    threshold: float
    suspect_labels: list[int]
    per_label: list[dict[str, Any]]
    strengths: list[float]
    grid: int
    success: float
    seed: int | None = None
    steps: int | None = None
    seconds: float | None = None


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

    method: _Name
    threshold: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Policy:
    __pydantic_config__ = _STRICT
    mode: _Mode = "enforce"


@dataclass
class RepairSettings:
    __pydantic_config__ = _STRICT
    pixels: int = 16


@dataclass
class Calibration:
    __pydantic_config__ = _STRICT
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

    model_sha256: _Sha256
    input_shape: _Shape
    num_classes: int
    feature_layer: _Name
    fpr: _Fpr
    checks: dict[str, CheckEntry]
    inner_layer: str | None = None
    token_blocks: list[str] | None = None
    """A token model's blocks whose token statistics the ``token`` check reads (tensors ``tokens.mean.I`` and
    ``tokens.whiten.I``, :class:`~guard.model.tokens.TokenStatistics`); None for other models."""
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
    """The trigger memory's calibrated settings (:meth:`guard.online.memory.TriggerMemory.to_settings`), with the
    labels it watches (None: every label); None when the scan did not add it (``--memory off``)."""
    trajectory: dict[str, Any] | None = None
    """The trajectory check's settings and threshold (:meth:`guard.online.trajectory.Trajectory.to_profile`;
    its references and detector are the ``trajectory.*`` tensors); None when the scan did not add it
    (``guard scan --trajectory`` does)."""
    warp: WarpScan | None = None
    """The warp reversal's result (:class:`WarpScan`); None when the scan did not run it."""
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

    def set_warp(self, result: dict[str, Any], fields: np.ndarray) -> None:
        """Store the warp reversal's :meth:`~guard.scan.warp.WarpReversal.to_profile` output."""
        self.warp = WarpScan(**result)
        self.tensors["warp.fields"] = np.asarray(fields, dtype=np.float32)

    def watched_labels(self) -> list[int]:
        """Every label this profile holds suspect: Neural Cleanse's suspects, the warp reversal's, and the labels
        its trigger memory watches (which include those a still earlier profile named). A scan of the model
        ``guard purify`` made of this one keeps its memory on them (``guard scan --watch-from``)."""
        out = {int(s) for s in self.suspect_labels}
        if self.warp is not None:
            out |= {int(s) for s in self.warp.suspect_labels}
        if self.memory is not None and self.memory.get("labels") is not None:
            out |= {int(s) for s in self.memory["labels"]}
        return sorted(out)

    def set_trajectory(self, settings: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Store :meth:`guard.online.trajectory.Trajectory.to_profile`'s output."""
        self.trajectory = dict(settings)
        self.tensors.update({f"trajectory.{k}": v for k, v in tensors.items()})

    def trajectory_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """``(settings, tensors)`` as :meth:`guard.online.trajectory.Trajectory.from_profile` takes them; None
        when the profile has no trajectory check."""
        return None if self.trajectory is None else (dict(self.trajectory), self._under("trajectory."))

    def set_tokens(self, blocks: list[str], tensors: dict[str, np.ndarray]) -> None:
        """Store :meth:`guard.model.tokens.TokenStatistics.to_profile`'s output."""
        self.token_blocks = list(blocks)
        self.tensors.update({f"tokens.{k}": v for k, v in tensors.items()})

    def token_state(self) -> tuple[list[str], dict[str, np.ndarray]] | None:
        """``(blocks, tensors)`` as :meth:`guard.model.tokens.TokenStatistics.from_profile` takes them; None
        when the profile has no token statistics."""
        return None if self.token_blocks is None else (list(self.token_blocks), self._under("tokens."))

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
        if self.trajectory is not None:  # and when the scan did not add the trajectory check
            out["trajectory"] = dict(self.trajectory)
        if self.warp is not None:  # likewise absent when the scan did not run the warp reversal
            out["warp"] = asdict(self.warp)
        if self.token_blocks is not None:  # and for models that are not token models
            out["token_blocks"] = list(self.token_blocks)
        return out

    @property
    def meta(self) -> dict[str, Any]:
        """Read-only JSON view of the metadata (:meth:`to_json`); edit the typed fields instead."""
        return self.to_json()

    @classmethod
    def from_json(cls, meta: Any, tensors: dict[str, np.ndarray] | None = None, *, where: str = JSON_NAME) -> Profile:
        """Validate ``profile.json``'s content (current schema, :class:`_ProfileJSON`; JSON values, as
        :func:`json.loads` gives them) and build the profile.

        A bad field raises :class:`~guard.errors.ProfileError` as one line naming ``where`` and the field's
        path; a schema version other than the current one raises :class:`~guard.errors.ProfileMismatch`.
        """
        if not isinstance(meta, dict):
            raise ProfileError(f"{where}: the top level must be an object")
        ver = meta.get("schema_version")
        if ver != SCHEMA_VERSION:  # before the schema: another version's fields are not this one's
            raise ProfileMismatch(f"{where}: schema_version {ver!r} is not {SCHEMA_VERSION}: "
                                  "rescan the model with this guard")
        try:  # as JSON text: strict pydantic takes a dataclass from a JSON object, not from a Python dict
            m = _ProfileJSON.model_validate_json(json.dumps(meta))
        except ValidationError as e:
            raise _profile_error(e, where) from None
        same = {f.name: getattr(m, f.name) for f in fields(Profile) if f.name != "tensors"}  # as the file has them
        return cls(**same | dict(checks={n: _settings_apart(CheckEntry, c) for n, c in m.checks.items()},
                                 ensemble=None if m.ensemble is None else _settings_apart(EnsembleEntry, m.ensemble),
                                 source=dict(m.source or {}),
                                 memory=None if m.memory is None else m.memory.model_dump(),
                                 trajectory=None if m.trajectory is None else m.trajectory.model_dump()),
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


# ---------------------------------------------------------------------- the schema of profile.json
def _model_of(cls: type, *, omit: tuple[str, ...] = (), extra: Literal["forbid", "allow"] = "forbid",
              **more: Any) -> type[BaseModel]:
    """A pydantic model of dataclass ``cls``'s fields (types, rules and defaults) less ``omit``, with ``more``
    (``name=(type, default)``) added or put instead: a section of ``profile.json`` laid out unlike ``cls``."""

    def default(f: Any) -> Any:  # a dataclass field's default as pydantic takes it (``...``: required)
        if f.default_factory is not MISSING:
            return Field(default_factory=f.default_factory)
        return ... if f.default is MISSING else f.default

    hints = get_type_hints(cls, include_extras=True)
    own = {f.name: (hints[f.name], default(f)) for f in fields(cls) if f.name not in omit}
    return create_model(f"_{cls.__name__}JSON", __config__=ConfigDict(_STRICT, extra=extra), **own | more)


def _settings_apart(cls: type, m: BaseModel) -> Any:
    """``cls`` (:class:`CheckEntry`, :class:`EnsembleEntry`) from its flat entry: the fields beside the settings."""
    return cls(**{k: getattr(m, k) for k in type(m).model_fields}, settings=dict(m.model_extra or {}))


class _MemoryJSON(BaseModel):
    """The trigger memory's settings (:meth:`guard.online.memory.TriggerMemory.to_settings`), all required."""

    model_config = _STRICT
    size: _Positive
    n_features: _Positive
    duplicate: float
    seed: int
    labels: list[int] | None = None
    matches: _Positive | None = None
    coarse: _Positive | None = None
    threshold: float
    energy_threshold: float | None = None
    floor_threshold: float | None = None
    fpr: _Fpr


class _TrajectoryJSON(BaseModel):
    """The trajectory check's settings (:meth:`guard.online.trajectory.Trajectory.to_profile`), all required."""

    model_config = _STRICT
    layers: Annotated[list[str], _rule(lambda v: len(v) >= 2, "must name at least two layers")]
    spatial: _Positive | None
    max_dim: _Positive
    n_components: _Positive | Literal["mle"]
    per_class: _Positive | None
    threshold: float
    fpr: _Fpr


# A check's entry and the ensemble's are flat: the fixed fields beside the settings (the check's own, any keys).
_CheckJSON = _model_of(CheckEntry, omit=("settings",), extra="allow")
_EnsembleJSON = _model_of(EnsembleEntry, omit=("settings",), extra="allow")
_ProfileJSON = _model_of(
    Profile, omit=("tensors",), schema_version=(int, ...), tensor_names=(list[str], []),
    checks=(Annotated[dict[str, _CheckJSON], _rule(bool, "must name at least one calibrated check")], ...),
    ensemble=(_EnsembleJSON | None, None), memory=(_MemoryJSON | None, None),
    trajectory=(_TrajectoryJSON | None, None), source=(dict[str, Any] | None, None))
"""``profile.json``, schema version 2, as :meth:`Profile.to_json` writes it: :class:`Profile`'s fields but the
tensors, with the file's schema version and tensor names, the flat checks and ensemble, the memory's settings
and a null source allowed. Open maps by design: ``checks`` (by check name), their and the ensemble's settings,
``source``, ``checks_off``, ``suspect_neurons`` and ``scan.samples``."""


_MUST_BE = {"float_type": "a number", "finite_number": "a finite number", "int_type": "an integer",
            "bool_type": "true or false", "string_type": "a string", "string_too_short": "a non-empty string",
            "list_type": "a list", "tuple_type": "a list", "dict_type": "an object", "model_type": "an object",
            "dataclass_type": "an object"}
_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")  # a model's unknown field, a dataclass's


def _profile_error(e: ValidationError, where: str) -> ProfileError:
    """pydantic's first error as one line naming the file and the field path (``profile.json:
    scan.per_label[0].l1_norm must be a number``); an unknown field names the close field it may mean."""
    errors = e.errors()  # an unknown field first: a misspelled required field is also a missing one
    err = next((x for x in errors if x["type"] in _UNKNOWN), errors[0])
    loc = err["loc"]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "the top level"
    if err["type"] in _UNKNOWN:
        close = get_close_matches(str(loc[-1]), _fields_at(loc[:-1]), n=1)
        text = f"unknown field {path}" + (f" (did you mean {close[0]!r}?)" if close else "")
    elif err["type"] == "missing":
        text = f"{path} is missing"
    elif err["type"] == "value_error":
        text = f"{path} {err['ctx']['error']}"
    else:
        text = f"{path} must be {_MUST_BE[err['type']]}" if err["type"] in _MUST_BE else f"{path}: {err['msg']}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ProfileError(f"{where}: {text}{more}")


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the section at ``loc`` (a path into :class:`_ProfileJSON`), for hints."""

    def types(tp: Any) -> dict[str, Any]:  # a model's or a dataclass's fields' types; none for other types
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return {n: f.annotation for n, f in tp.model_fields.items()}
        return get_type_hints(tp) if is_dataclass(tp) else {}

    tp: Any = _ProfileJSON
    for part in loc:  # a section's field, or a list's or a map's item (its type's last argument)
        tp = types(tp)[part] if types(tp) else get_args(tp)[-1]
        tp = next(a for a in get_args(tp) if a is not type(None)) if type(None) in get_args(tp) else tp
    return list(types(tp))
