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

Each request of a batch is decoded on its own (``guard.serving.decode.decode_request``): a bad one answers 400
(413 when too large) with ``{"error": ...}`` while the others proceed; all valid instances go through
one ``Guard.run``. Answers are ``{"predictions": [{label, probabilities, verdict, reasons, scores}]}``;
a single-instance request that is rejected answers 403 with the same body. If the guard itself fails
(a bug, not bad input), ``fail_open: false`` (default) answers 503 ``{"error": ...}``;
``fail_open: true`` answers the bare model's prediction with ``verdict: "error"`` and reason
``guard_error``. Metrics: see ``guard.serving.metrics``. Every instance answered ``rejected``, ``repaired``,
``flagged`` or (fail-open) ``error`` gets one line in the audit log (``guard.serving.trail``), keyed by
TorchServe's request id, which its frontend returns as the ``x-request-id`` response header.

TorchServe imports this module by file name and instantiates its only class; helpers are functions
or come from the installed ``guard`` package (``ts`` is imported only here, never inside ``guard``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from guard.cli.archive import profile_digest
from guard.errors import GuardError, PayloadTooLarge, ProfileError
from guard.model import fingerprint, load_model
from guard.online import Guard
from guard.online.policy import check_mode
from guard.profile import Profile
from guard.serving.decode import decode_request
from guard.serving.metrics import TorchServeSink, record_decisions
from guard.serving.trail import AuditLog
from guard.torchserve.context import (
    content_length,
    content_type,
    handler_config,
    request_body,
    request_headers,
    request_id,
    set_json,
    set_status,
)

logger = logging.getLogger(__name__)

PROFILE_DIR = "guard-profile"
# Larger bodies answer 413 (guard archive --max-request-bytes). guard serve sets TorchServe's own
# max_request_size above it, so this JSON 413 is what a client sees, not the frontend's.
DEFAULT_MAX_REQUEST_BYTES = 1_048_576


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


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
        self._session = contextlib.ExitStack()  # the guard's feature hook, held for the worker's life

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
        self._session.close()
        self._session.enter_context(self.guard.session())  # one hook per worker, not one per batch
        self.guard.warmup()  # compile/load the batch-1 kernel now, not on the first client's request
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
            headers = request_headers(context, idx)
            try:
                size = content_length(headers)
                if size is not None and size > self.max_request_bytes:
                    raise PayloadTooLarge(f"request body is {size} bytes, above the limit of "
                                          f"{self.max_request_bytes} bytes")
                out.append(decode_request(request_body(row), content_type(headers, row),
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
            set_json(context, idx)
            rid = request_id(context, idx)
            if isinstance(item, GuardError):
                sink.requests("error")
                set_status(context, idx, item.http_status)
                responses.append({"error": str(item)})
                continue
            n = len(item)
            if not decisions:  # fail closed
                sink.requests("error", n)
                set_status(context, idx, 503)
                responses.append({"error": f"the guard could not check this request ({failure}); "
                                           "not answering unguarded"})
                cursor += n
                continue
            mine = decisions[cursor:cursor + n]
            cursor += n
            record_decisions(sink, mine)
            status = 403 if n == 1 and mine[0].verdict == "rejected" else 200
            if status != 200:
                set_status(context, idx, status)
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
