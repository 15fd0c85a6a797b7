"""Audit trail: one JSON line for every instance the guard rejected, repaired or flagged.

Why: metrics say *how many* inputs were refused; an incident review needs *which* requests, when, for
which model and why. The handler calls :meth:`AuditLog.write` for every answered instance and the
log keeps the ones worth auditing (verdict ``rejected``, ``repaired``, ``flagged``, and ``error``,
which under ``fail_open`` marks an answer the guard did not check). A ``pass`` is not logged: the
trail stays small and mostly holds what someone should look at.

Each line is one JSON object::

    {"time": "2026-11-02T13:07:15.123Z", "request_id": "...", "instance": 0, "model": "demo",
     "model_sha256": "...", "mode": "enforce", "status": 403, "verdict": "rejected", "label": null,
     "reasons": ["neuron"], "scores": {"neuron": 12.3, ...}}

with exactly the ``verdict``, ``label``, ``reasons`` and ``scores`` the client was told, and
``request_id`` TorchServe's id for the request (its frontend returns the same id to the client as the
``x-request-id`` response header, so a client's complaint can be matched to its line). The request body is never
logged unless the archive was built with ``--log-payloads`` (then ``payload`` carries the decoded
instance, float32, base64: see :func:`decode_payload`); request headers (``Authorization``) never are.

The file rotates by size (:class:`logging.handlers.RotatingFileHandler`, ``max_bytes`` and
``backups``). Where it goes, first match wins: the ``GUARD_AUDIT_LOG`` environment variable, the
``audit_log`` key of the archive's model-config ``handler:`` section, TorchServe's log directory
(``$LOG_LOCATION``, which ``guard serve`` sets to its run directory's ``logs/``), the model directory.
``{model}`` and ``{pid}`` in the path are substituted: rotation is per process, so a model served by
several workers should use ``{pid}`` (or one path per worker) to keep each file with one writer.

Writing never raises into a request: a failed write is reported through ``logging``'s own error
handling and the answer goes out anyway. Opening the file does raise (the handler then refuses to
load: a guard that was asked to keep an audit trail and cannot is not served).
"""

from __future__ import annotations

import base64
import json
import logging
import logging.handlers
import os
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ENV_PATH = "GUARD_AUDIT_LOG"
DEFAULT_NAME = "guard-audit-{model}.log"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
AUDITED_VERDICTS = frozenset({"rejected", "repaired", "flagged", "error"})

_log = logging.getLogger(__name__)
_counter = 0
_counter_lock = threading.Lock()


def resolve_path(configured: str | os.PathLike[str] | None, *, model: str, model_dir: str | os.PathLike[str],
                 env: Mapping[str, str] | None = None) -> Path:
    """Where the audit log of ``model`` goes (see the module docstring for the order).

    A relative path is taken relative to TorchServe's log directory (``$LOG_LOCATION``) when set, else
    to ``model_dir``. ``{model}`` and ``{pid}`` are substituted.
    """
    env = os.environ if env is None else env
    base = Path(env["LOG_LOCATION"]) if env.get("LOG_LOCATION") else Path(model_dir)
    chosen = env.get(ENV_PATH) or (str(configured) if configured else None) or DEFAULT_NAME
    safe_model = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(model)) or "model"
    path = Path(chosen.replace("{model}", safe_model).replace("{pid}", str(os.getpid())))
    return path if path.is_absolute() else base / path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_payload(x: np.ndarray) -> dict[str, Any]:
    """A decoded instance ``(C, H, W)`` as JSON: dtype, shape and the float32 bytes in base64 (exact)."""
    arr = np.ascontiguousarray(x, dtype="<f4")
    return {"dtype": "float32", "shape": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_payload(payload: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_payload`: the instance the guard saw, for forensics."""
    raw = base64.b64decode(payload["b64"])
    return np.frombuffer(raw, dtype="<f4").reshape(payload["shape"]).astype(np.float32)


def _field(decision: Any, name: str) -> Any:
    return decision.get(name) if isinstance(decision, Mapping) else getattr(decision, name, None)


class AuditLog:
    """A size-rotated JSON-lines audit log for one served model.

    ``path`` is the file (parents created); ``model``, ``model_sha256`` and ``mode`` are written on
    every line so a line stands on its own after rotation; ``max_bytes``/``backups`` configure the
    rotation; ``log_payloads`` adds the decoded instance (off by default: inputs may be personal data).
    """

    def __init__(self, path: str | os.PathLike[str], *, model: str, model_sha256: str, mode: str,
                 max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS, log_payloads: bool = False):
        global _counter
        if int(max_bytes) <= 0 or int(backups) < 0:
            raise ValueError(f"audit log needs max_bytes > 0 and backups >= 0, got {max_bytes}, {backups}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.model, self.model_sha256, self.mode = str(model), str(model_sha256), str(mode)
        self.log_payloads = bool(log_payloads)
        self.max_bytes, self.backups = int(max_bytes), int(backups)
        self._handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=self.max_bytes,
                                                             backupCount=self.backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        with _counter_lock:
            _counter += 1
            n = _counter
        # A logger outside the logging tree: nothing propagates to TorchServe's worker log (stdout).
        self._logger = logging.Logger(f"guard.audit.{n}", level=logging.INFO)
        self._logger.propagate = False
        self._logger.addHandler(self._handler)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, model: str, model_sha256: str, mode: str,
                    model_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> AuditLog:
        """Open the log a model-config ``handler:`` section asks for.

        Keys: ``audit_log`` (path), ``audit_max_bytes``, ``audit_backups``, ``log_payloads``; all optional.
        Raises ``ValueError`` on a bad number and ``OSError`` when the file cannot be opened.
        """
        path = resolve_path(cfg.get("audit_log"), model=model, model_dir=model_dir, env=env)
        log_payloads = cfg.get("log_payloads", False)
        if isinstance(log_payloads, str):
            log_payloads = log_payloads.strip().lower() in ("1", "true", "yes", "on")
        return cls(path, model=model, model_sha256=model_sha256, mode=mode,
                   max_bytes=int(cfg.get("audit_max_bytes", DEFAULT_MAX_BYTES)),
                   backups=int(cfg.get("audit_backups", DEFAULT_BACKUPS)), log_payloads=bool(log_payloads))

    def write(self, *, request_id: str | None, instance: int, status: int, decision: Any,
               payload: np.ndarray | None = None) -> dict[str, Any] | None:
        """Write the line of one answered instance if its verdict is audited; return it (or None).

        ``decision`` is a :class:`guard.online.Decision` or its ``to_dict()``: the fields written are
        the ones the client received. ``payload`` is the decoded instance; it is written only when
        the log was opened with ``log_payloads``.
        """
        verdict = str(_field(decision, "verdict"))
        if verdict not in AUDITED_VERDICTS:
            return None
        entry: dict[str, Any] = {
            "time": _now(), "request_id": None if request_id is None else str(request_id),
            "instance": int(instance), "model": self.model, "model_sha256": self.model_sha256, "mode": self.mode,
            "status": int(status), "verdict": verdict, "label": _field(decision, "label"),
            "reasons": [str(r) for r in (_field(decision, "reasons") or [])],
            "scores": {str(k): _finite(v) for k, v in dict(_field(decision, "scores") or {}).items()},
        }
        if self.log_payloads and payload is not None:
            entry["payload"] = encode_payload(payload)
        try:
            line = json.dumps(entry, separators=(",", ":"), allow_nan=False, default=_jsonable)
        except (TypeError, ValueError) as e:  # never fail the request over its audit line
            _log.warning("guard: audit line for request %s not written: %s", request_id, e)
            return None
        self._logger.info(line)
        return entry

    def close(self) -> None:
        """Flush and close the file (the handler does this when the worker stops)."""
        self._logger.removeHandler(self._handler)
        self._handler.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finite(value: Any) -> float | None:
    """A score as a float, or None when it is not a finite number (JSON has no NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in a decision (scores are floats already; this is belt and braces)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every entry of an audit log and its rotated backups (``.N``, oldest first), for tests and reviews."""
    path = Path(path)
    backups = [p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()]
    out = []
    for f in [*sorted(backups, key=lambda p: -int(p.suffix[1:])), path]:
        if f.is_file():
            out += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


__all__ = ["AUDITED_VERDICTS", "DEFAULT_BACKUPS", "DEFAULT_MAX_BYTES", "DEFAULT_NAME", "ENV_PATH", "AuditLog",
           "decode_payload", "encode_payload", "read_lines", "resolve_path"]
