"""The profile: what the offline scan learned, bound to one model by its SHA-256.

A profile is a directory with ``profile.json`` (schema version, model fingerprint, input shape,
per-label scan results, suspect labels, thresholds with the FPR they were calibrated for, policy)
and ``tensors.safetensors`` (masks, patterns, neuron weights, calibration statistics). Writes are
atomic (a temporary sibling directory renamed into place); loads verify schema and hash and refuse a
mismatch rather than guarding a model with another model's thresholds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from guard.errors import ProfileError, ProfileMismatch

SCHEMA_VERSION = 1
JSON_NAME = "profile.json"
TENSORS_NAME = "tensors.safetensors"


@dataclass
class Profile:
    """Metadata (``meta``, JSON-ready) plus named numpy arrays (``tensors``)."""

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def model_sha256(self) -> str:
        return self.meta["model_sha256"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])  # type: ignore[return-value]

    @property
    def suspect_labels(self) -> list[int]:
        return list(self.meta.get("suspect_labels", []))

    def save(self, directory: str | Path) -> Path:
        """Write atomically to ``directory`` (replacing an existing profile there)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, schema_version=SCHEMA_VERSION)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (tmp / JSON_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
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
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ProfileMismatch(f"profile schema_version {meta.get('schema_version')!r} is not "
                                  f"{SCHEMA_VERSION}: rescan the model with this guard")
        if model_sha256 is not None and meta["model_sha256"] != model_sha256:
            raise ProfileMismatch(f"profile was built for model {meta['model_sha256'][:12]}…, "
                                  f"this model is {model_sha256[:12]}…: rescan it")
        try:
            tensors = load_file(str(tpath))
        except Exception as e:
            raise ProfileError(f"{tpath} is unreadable or truncated: {e}") from e
        missing = [k for k in meta.get("tensor_names", []) if k not in tensors]
        if missing:
            raise ProfileError(f"{tpath} lacks tensors {missing}")
        return cls(meta=meta, tensors=dict(tensors))
