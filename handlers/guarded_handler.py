"""TorchServe handler: a thin adapter from TorchServe's batch API to :class:`guard.online.Guard`.

``guard archive`` packs this file with the model file, its ``state_dict``, the profile (directory
``guard-profile/`` in the archive) and a ``model-config.yaml`` whose ``handler:`` section sets
``mode`` (enforce | repair | shadow), ``fail_open``, ``max_request_bytes``, ``profile_sha256`` and the
audit-log settings (``audit_log``, ``audit_max_bytes``, ``audit_backups``, ``log_payloads``).

Load: the model, the weights and the profile are loaded, the profile's files are checked against the
digest ``guard archive`` recorded and its SHA-256 binding to the model is checked; a missing,
truncated, edited or foreign profile makes ``initialize`` raise after one ``GUARD REFUSED TO LOAD``
log line, so TorchServe never serves the model's raw output (its worker retries and refuses again;
requests wait unanswered in TorchServe's queue meanwhile, and get 503 once the model is scaled to no
worker; TorchServe's /ping still says Healthy). An audit log that cannot be opened refuses the load
too. ``fail_open: true`` is logged as a WARNING at every load.

Each request of a batch is decoded on its own (``guard.io.decode_request``): a bad one answers 400
(413 when too large) with ``{"error": ...}`` while the others proceed; all valid instances go through
one ``Guard.run``. Answers are ``{"predictions": [{label, probabilities, verdict, reasons, scores}]}``;
a single-instance request that is rejected answers 403 with the same body. If the guard itself fails
(a bug, not bad input), ``fail_open: false`` (default) answers 503 ``{"error": ...}``;
``fail_open: true`` answers the bare model's prediction with ``verdict: "error"`` and reason
``guard_error``. Metrics: see ``guard.metrics``. Every instance answered ``rejected``, ``repaired``,
``flagged`` or (fail-open) ``error`` gets one line in the audit log (``guard.audit_log``), keyed by
TorchServe's request id, which its frontend returns as the ``x-request-id`` response header.

TorchServe imports this module by file name and instantiates its only class; helpers are functions
or come from the installed ``guard`` package (``ts`` is imported only here, never inside ``guard``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from guard.audit_log import AuditLog
from guard.commands.archive import profile_digest
from guard.errors import GuardError, PayloadTooLarge, ProfileError
from guard.io import decode_request
from guard.metrics import TorchServeSink, record_decisions
from guard.model import fingerprint, load_model
from guard.online import Guard
from guard.online.policy import check_mode
from guard.profile import Profile

logger = logging.getLogger(__name__)

PROFILE_DIR = "guard-profile"
# Larger bodies answer 413 (guard archive --max-request-bytes). guard serve sets TorchServe's own
# max_request_size above it, so this JSON 413 is what a client sees, not the frontend's.
DEFAULT_MAX_REQUEST_BYTES = 1_048_576
_PHRASES = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


def handler_config(context: Any) -> dict[str, Any]:
    """The ``handler:`` section of the archive's model-config.yaml (top-level keys as a fallback)."""
    cfg = getattr(context, "model_yaml_config", None) or {}
    if not isinstance(cfg, dict):
        return {}
    section = cfg.get("handler")
    return dict(section) if isinstance(section, dict) else dict(cfg)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _request_body(row: Any) -> Any:
    """The payload of one request: TorchServe names a raw body ``body`` (form fields keep their names)."""
    if not isinstance(row, dict):
        return row
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    values = [v for v in row.values() if v is not None]
    return values[0] if values else None


def _request_headers(context: Any, idx: int) -> dict[str, Any]:
    try:
        return dict(context.get_all_request_header(idx) or {})
    except Exception:  # no request processor (not inside a TorchServe request)
        return {}


def _content_type(headers: dict[str, Any], row: Any) -> str | None:
    """The body parameter's content type if TorchServe recorded one, else the HTTP header."""
    if isinstance(row, dict):
        for name in ("body", "data", *row.keys()):
            part = headers.get(name)
            if isinstance(part, dict) and part.get("content-type"):
                return str(part["content-type"])
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "content-type" and isinstance(value, str):
            return value
    return None


def _content_length(headers: dict[str, Any]) -> int | None:
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "content-length":
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _set_status(context: Any, idx: int, code: int) -> None:
    if getattr(context, "request_processor", None) is not None:
        context.set_response_status(code, _PHRASES.get(code, ""), idx)


def _set_json(context: Any, idx: int) -> None:
    if getattr(context, "request_processor", None) is not None:
        context.set_response_content_type(idx, "application/json")


def _request_id(context: Any, idx: int) -> str | None:
    """TorchServe's id of request ``idx``: the audit log's key. The frontend returns the same id to the
    client as the ``x-request-id`` response header, so a client's complaint finds its audit line."""
    try:
        rid = context.get_request_id(idx)
    except Exception:  # no id map (not inside a TorchServe request)
        return None
    return None if rid is None else str(rid)


def _check_profile_digest(profile_dir: Path, expected: Any) -> None:
    """Refuse a profile whose files differ from what ``guard archive`` packed (edited in the archive)."""
    if not expected:
        logger.warning("guard: the archive records no profile digest (made by an older guard archive?): "
                       "the profile's integrity is not checked, only its binding to the model")
        return
    if not isinstance(expected, dict):
        raise ProfileError(f"profile_sha256 in model-config.yaml is not a mapping: {expected!r}")
    try:
        actual = profile_digest(profile_dir)
    except OSError as e:
        raise ProfileError(f"profile directory not readable: {profile_dir}: {e}") from None
    changed = sorted(name for name, digest in expected.items() if actual.get(name) != digest)
    if changed:
        raise ProfileError(f"profile file(s) {', '.join(changed)} in {profile_dir} differ from what guard archive "
                           "packed (SHA-256 mismatch): the profile was modified after archiving")


class GuardedHandler:
    """TorchServe entry point: ``initialize(context)`` once per worker, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.initialized = False
        self.guard: Guard | None = None
        self.model_name = ""
        self.fail_open = False
        self.max_request_bytes = DEFAULT_MAX_REQUEST_BYTES
        self.audit: AuditLog | None = None

    # ------------------------------------------------------------------ load
    def initialize(self, context: Any) -> None:
        """Load model, weights and profile from the archive; refuse (raise) on any mismatch."""
        self.model_name = str(getattr(context, "model_name", "") or "")
        try:
            self._load(context)
        except Exception as e:
            logger.error("GUARD REFUSED TO LOAD model %s: %s: %s (the model is not served unguarded)",
                         self.model_name, type(e).__name__, e)
            raise
        self.initialized = True
        if self.fail_open:
            logger.warning("GUARD FAIL-OPEN: model %s was archived with --fail-open: if the guard itself fails "
                           "on a batch, the bare model's answers are served UNGUARDED (verdict=error) instead of "
                           "503; re-archive without --fail-open to fail closed", self.model_name)
        logger.info("guard: model %s loaded, mode %s, fail_open %s, suspect labels %s, checks %s, audit log %s",
                    self.model_name, self.guard.mode, self.fail_open, self.guard.profile.suspect_labels,
                    ",".join(self.guard.names), self.audit.path if self.audit else None)

    def _load(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props.get("model_dir") or ".")
        cfg = handler_config(context)
        manifest_model = (getattr(context, "manifest", None) or {}).get("model", {})
        model_file = cfg.get("model_file") or manifest_model.get("modelFile")
        weights = cfg.get("weights") or manifest_model.get("serializedFile")
        if not model_file or not weights:
            raise GuardError("the archive names no model file or serialized weights (use guard archive)")
        mode = check_mode(str(cfg.get("mode", "enforce")))
        self.fail_open = _as_bool(cfg.get("fail_open", False))
        try:
            self.max_request_bytes = int(cfg.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES))
        except (TypeError, ValueError):
            raise GuardError(f"max_request_bytes must be an integer, got {cfg.get('max_request_bytes')!r}") from None
        if self.max_request_bytes <= 0:
            raise GuardError(f"max_request_bytes must be > 0, got {self.max_request_bytes}")
        model = load_model(model_dir / model_file, model_dir / weights,
                           model_class_name=cfg.get("model_class") or None, normalize=cfg.get("normalize") or None)
        profile_dir = model_dir / str(cfg.get("profile", PROFILE_DIR))
        if profile_dir.is_dir():  # a missing directory is Profile.load's clear error
            _check_profile_digest(profile_dir, cfg.get("profile_sha256"))
        profile = Profile.load(profile_dir, model_sha256=fingerprint(model))
        self.guard = Guard(model, profile, mode=mode, verify=False)
        try:
            self.audit = AuditLog.from_config(cfg, model=self.model_name or "model", model_sha256=profile.model_sha256,
                                              mode=mode, model_dir=model_dir)
        except (OSError, ValueError, TypeError) as e:
            raise GuardError(f"cannot open the audit log: {e}") from None

    # ------------------------------------------------------------------ serve
    def preprocess(self, data: list[Any], context: Any) -> list[np.ndarray | GuardError]:
        """Decode each request of the batch on its own: a batch ``(n, C, H, W)`` or the error to answer."""
        out: list[np.ndarray | GuardError] = []
        for idx, row in enumerate(data):
            headers = _request_headers(context, idx)
            try:
                size = _content_length(headers)
                if size is not None and size > self.max_request_bytes:
                    raise PayloadTooLarge(f"request body is {size} bytes, above the limit of "
                                          f"{self.max_request_bytes} bytes")
                out.append(decode_request(_request_body(row), _content_type(headers, row),
                                          input_shape=self.guard.input_shape, max_bytes=self.max_request_bytes))
            except GuardError as e:
                out.append(e)
            except Exception:  # a decoder bug: answer this request 500, keep the rest of the batch
                logger.exception("guard: decoding request %d failed unexpectedly", idx)
                err = GuardError("could not decode the request (internal error, see the model log)")
                err.http_status = 500
                out.append(err)
        return out

    def handle(self, data: list[Any], context: Any) -> list[dict[str, Any]]:
        """One response per request; per-request statuses through ``context.set_response_status``."""
        if not self.initialized or self.guard is None:
            raise RuntimeError("GuardedHandler.handle called before a successful initialize")
        sink = TorchServeSink(context.metrics, Dimension, MetricTypes.HISTOGRAM,
                              on_error=lambda e: logger.warning("guard: metric not recorded: %s", e))
        items = self.preprocess(data, context)
        valid = [i for i, it in enumerate(items) if isinstance(it, np.ndarray)]
        decisions: list[Any] = []
        failure: str | None = None
        if valid:
            x = np.concatenate([items[i] for i in valid])
            try:
                result = self.guard.run(x)
                decisions = result.decisions
                sink.latency(result.guard_ms / 1e3)
            except Exception as e:  # the guard's own failure, not bad input (inputs were validated)
                logger.exception("guard: checking a batch of %d failed", len(x))
                failure = type(e).__name__  # details go to the model log, not to clients
                if self.fail_open:
                    try:
                        decisions = self._unguarded(x)
                    except Exception:  # the model itself failed too: nothing to answer with
                        logger.exception("guard: fail_open could not run the bare model either")
        responses: list[dict[str, Any]] = []
        cursor = 0
        for idx, item in enumerate(items):
            _set_json(context, idx)
            rid = _request_id(context, idx)
            if isinstance(item, GuardError):
                sink.requests("error")
                _set_status(context, idx, item.http_status)
                responses.append({"error": str(item)})
                continue
            n = len(item)
            if not decisions:  # fail closed
                sink.requests("error", n)
                _set_status(context, idx, 503)
                responses.append({"error": f"the guard could not check this request ({failure}); "
                                           "not answering unguarded"})
                cursor += n
                continue
            mine = decisions[cursor:cursor + n]
            cursor += n
            record_decisions(sink, mine)
            status = 403 if n == 1 and mine[0].verdict == "rejected" else 200
            if status != 200:
                _set_status(context, idx, status)
            answers = [d.to_dict() for d in mine]
            self._audit(rid, status, answers, item)
            responses.append({"predictions": answers})
        return responses

    def _audit(self, request_id: str | None, status: int, answers: list[dict[str, Any]], x: np.ndarray) -> None:
        """One audit line per non-pass instance, with exactly the fields the client is sent."""
        if self.audit is None:
            return
        for j, answer in enumerate(answers):
            try:
                self.audit.record(request_id=request_id, instance=j, status=status, decision=answer, payload=x[j])
            except Exception:  # the trail must not turn an answer into a 5xx
                logger.exception("guard: audit line for request %s not written", request_id)

    def _unguarded(self, x: np.ndarray) -> list[Any]:
        """fail_open: the bare model's answers, marked ``verdict="error"`` (the guard did not check them)."""
        import torch

        from guard.online import Decision

        with torch.inference_mode():
            logits = self.guard.model(torch.from_numpy(x)).numpy()
        z = np.exp(logits - logits.max(1, keepdims=True))
        p = z / z.sum(1, keepdims=True)
        return [Decision(int(p[i].argmax()), [round(float(v), 6) for v in p[i]], "error", ["guard_error"], {})
                for i in range(len(x))]


__all__ = ["GuardedHandler"]
