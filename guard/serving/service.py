"""Serving a guarded model without TorchServe: requests in, replies out.

:class:`GuardService` is everything the TorchServe handler does, minus TorchServe. At load
(:meth:`GuardService.from_archive_config`) it reads the ``handler:`` section of an archive's
``model-config.yaml`` (:class:`ArchiveConfig`), loads the model and its weights, checks the profile's
files against the digest ``guard archive`` recorded (:mod:`guard.serving.integrity`) and the profile's
binding to the model, opens the audit trail, holds the guard's feature hook and warms it up; any
failure there raises after one ``GUARD REFUSED TO LOAD`` log line, so the model is never served
unguarded. Per batch (:meth:`GuardService.handle`) each request is decoded on its own
(:func:`guard.serving.decode.decode_request`): an undecodable one answers 400, one above
``max_request_bytes`` 413, while the others proceed; all valid instances go through one
:meth:`guard.online.Guard.run`. Answers are ``{"predictions": [{label, probabilities, verdict, reasons,
scores}]}``, or for an Open Inference Protocol (v2) request ``{"model_name", "id", "outputs": [label,
probabilities, verdict, reasons]}`` (:func:`v2_body`); a single-instance request that is rejected answers
403 (with the same body form). If the guard itself fails (a
bug, not bad input) the service fails closed with 503 ``{"error": ...}``, or with ``fail_open``
answers the bare model's prediction marked ``verdict: "error"``, reason ``guard_error``. Counters go
to a :class:`~guard.serving.metrics.MetricsSink`; every rejected, repaired, flagged or (fail-open)
error instance gets one audit line (:mod:`guard.serving.trail`) keyed by the request's id.

:class:`BaselineService` is the same request path without the guard (the unguarded baseline of
``guard bench``): the same config, decoding, 400/413 statuses and batch split, one forward pass,
``{"predictions": [{label, probabilities}]}``.

Nothing here knows TorchServe: :mod:`guard.torchserve.context` turns its context and rows into
:class:`Request` objects and applies each :class:`Reply`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.errors import GuardError, PayloadTooLarge
from guard.model import fingerprint, load_model
from guard.online import Decision, Guard
from guard.online.engine import bare_predictions
from guard.online.policy import validate_mode
from guard.profile import Profile
from guard.serving import DEFAULT_MAX_REQUEST_BYTES, PROFILE_DIR, REFUSAL_MARK
from guard.serving.decode import V2, Decoded, decode_payload
from guard.serving.integrity import verify_profile_digest
from guard.serving.metrics import (
    DEFAULT_FLUSH_SECONDS,
    BatchedSink,
    MetricsSink,
    NullSink,
    count_decisions,
    flush_seconds,
)
from guard.serving.trail import AuditLog

logger = logging.getLogger(__name__)

TORCHSERVE_MAX_REQUEST_SIZE = 6_553_500
"""TorchServe 0.12's own ``max_request_size`` default: the stock handler's bound, and the floor of the frontend
bound ``guard serve`` writes (:func:`guard.torchserve.config.frontend_max_request_size`)."""
JSON = "application/json"


@dataclass(slots=True)
class Request:
    """One client request: its body as the server handed it (bytes, text, or parsed JSON), its
    headers, the server's id for it (the audit trail's key) and the body's media type (``None``: the
    ``Content-Type`` header, else sniffed from the body)."""

    body: Any
    headers: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    content_type: str | None = None


@dataclass(slots=True)
class Reply:
    """The answer to one request: HTTP status, a JSON-able body and its content type."""

    status: int
    body: dict[str, Any]
    content_type: str = JSON


def _header(headers: Mapping[str, Any], name: str) -> Any:
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value
    return None


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def handler_section(config: Any) -> dict[str, Any]:
    """The ``handler:`` section of a model-config.yaml mapping (its top-level keys as a fallback)."""
    if not isinstance(config, Mapping):
        return {}
    section = config.get("handler")
    return dict(section) if isinstance(section, Mapping) else dict(config)


@dataclass(frozen=True)
class ArchiveConfig:
    """What an archive's ``model-config.yaml`` ``handler:`` section (written by ``guard archive``) says.

    ``section`` keeps the raw mapping for the audit-log keys (``audit_log``, ``audit_max_bytes``,
    ``audit_backups``, ``log_payloads``); ``mode`` is checked by the guarded service only (the baseline
    ignores it). ``metrics_flush_seconds`` is how long pass counts may wait in the worker before they are
    reported (:class:`~guard.serving.metrics.BatchedSink`; 0 reports every batch as it comes).
    """

    model_file: str
    weights: str
    model_class: str | None
    normalize: str | None
    mode: str
    fail_open: bool
    max_request_bytes: int
    profile: str
    profile_sha256: Any
    section: dict[str, Any]
    metrics_flush_seconds: float = DEFAULT_FLUSH_SECONDS

    @classmethod
    def parse(cls, config: Any, *, manifest: Mapping[str, Any] | None = None,
              default_max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> ArchiveConfig:
        """Read and check the section; the archive's MANIFEST names the model files when the section does not."""
        cfg = handler_section(config)
        manifest_model = (manifest or {}).get("model", {}) or {}
        model_file = cfg.get("model_file") or manifest_model.get("modelFile")
        weights = cfg.get("weights") or manifest_model.get("serializedFile")
        if not model_file or not weights:
            raise GuardError("the archive names no model file or serialized weights (use guard archive)")
        raw_max = cfg.get("max_request_bytes", default_max_request_bytes)
        try:
            max_request_bytes = int(raw_max)
        except (TypeError, ValueError):
            raise GuardError(f"max_request_bytes must be an integer, got {raw_max!r}") from None
        if max_request_bytes <= 0:
            raise GuardError(f"max_request_bytes must be > 0, got {max_request_bytes}")
        try:
            flush = flush_seconds(cfg.get("metrics_flush_seconds", DEFAULT_FLUSH_SECONDS))
        except ValueError as e:
            raise GuardError(str(e)) from None
        return cls(model_file=str(model_file), weights=str(weights), model_class=cfg.get("model_class") or None,
                   normalize=cfg.get("normalize") or None, mode=str(cfg.get("mode", "enforce")),
                   fail_open=_as_bool(cfg.get("fail_open", False)), max_request_bytes=max_request_bytes,
                   profile=str(cfg.get("profile", PROFILE_DIR)), profile_sha256=cfg.get("profile_sha256"),
                   section=cfg, metrics_flush_seconds=flush)

    def load_model(self, model_dir: Path) -> torch.nn.Module:
        return load_model(model_dir / self.model_file, model_dir / self.weights, model_class_name=self.model_class,
                          normalize=self.normalize)


def v2_body(model_name: str, answers: Sequence[Mapping[str, Any]], *, request_id: str | None = None) -> dict[str, Any]:
    """Answers in the Open Inference Protocol's response form: one output tensor per field.

    ``label`` (INT64, ``[N]``; -1 where withheld), ``probabilities`` (FP32, ``[N, K]`` row-major; zeros where
    withheld, ``[N, 0]`` when every instance's are), and for the guard ``verdict`` (BYTES, ``[N]``) and
    ``reasons`` (BYTES, ``[N]``: the reasons of each instance joined with ``,``, empty for none). A rejected
    instance's label and probabilities are withheld exactly as in ``{"predictions": ...}`` (where they are
    null).
    """
    n = len(answers)
    k = max((len(a["probabilities"]) for a in answers if a.get("probabilities")), default=0)
    labels = [-1 if a.get("label") is None else int(a["label"]) for a in answers]
    probs = [float(v) for a in answers for v in (a.get("probabilities") or [0.0] * k)]
    outputs: list[dict[str, Any]] = [
        {"name": "label", "datatype": "INT64", "shape": [n], "data": labels},
        {"name": "probabilities", "datatype": "FP32", "shape": [n, k], "data": probs},
    ]
    if answers and "verdict" in answers[0]:
        outputs += [
            {"name": "verdict", "datatype": "BYTES", "shape": [n], "data": [str(a["verdict"]) for a in answers]},
            {"name": "reasons", "datatype": "BYTES", "shape": [n],
             "data": [",".join(str(r) for r in a.get("reasons") or []) for a in answers]},
        ]
    body: dict[str, Any] = {"model_name": model_name, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    return body


class _BatchService:
    """Decode each request on its own, answer every valid instance in one call, split the answers back.

    Subclasses give ``_answer(x)`` (the answers of a batch, or ``None`` and why, when it could not be
    answered) and ``_reply(request, decoded, answers)`` (one request's reply from its slice of them).
    """

    input_shape: tuple[int, int, int]
    max_request_bytes: int
    sink: MetricsSink
    model_name: str = ""

    def decode(self, request: Request) -> Decoded | GuardError:
        """The request's batch ``(n, C, H, W)`` and protocol, or the client error to answer it with."""
        try:
            size = _header(request.headers, "content-length")
            try:
                size = None if size is None else int(size)
            except (TypeError, ValueError):
                size = None
            if size is not None and size > self.max_request_bytes:
                raise PayloadTooLarge(f"request body is {size} bytes, above the limit of "
                                      f"{self.max_request_bytes} bytes")
            ctype = request.content_type
            if ctype is None:
                ctype = _header(request.headers, "content-type")
                ctype = ctype if isinstance(ctype, str) else None
            return decode_payload(request.body, ctype, input_shape=self.input_shape, max_bytes=self.max_request_bytes)
        except GuardError as e:
            return e
        except Exception:  # a decoder bug: answer this request 500, keep the rest of the batch
            logger.exception("guard: decoding request %s failed unexpectedly", request.request_id)
            err = GuardError("could not decode the request (internal error, see the model log)")
            err.http_status = 500
            return err

    def handle(self, requests: Sequence[Request]) -> list[Reply]:
        """One reply per request, in order."""
        items = [self.decode(r) for r in requests]
        valid = [it for it in items if not isinstance(it, GuardError)]
        answers: Sequence[Any] | None = None
        failure = ""
        if valid:
            x = valid[0].x if len(valid) == 1 else np.concatenate([it.x for it in valid])
            answers, failure = self._answer(x)
        replies: list[Reply] = []
        cursor = 0
        for request, item in zip(requests, items):
            if isinstance(item, GuardError):
                self.sink.requests("error")
                replies.append(Reply(item.http_status, {"error": str(item)}))
                continue
            n = len(item)
            if answers is None:  # the batch could not be answered: fail closed
                self.sink.requests("error", n)
                replies.append(Reply(503, {"error": f"the guard could not check this request ({failure}); "
                                                    "not answering unguarded"}))
            else:
                replies.append(self._reply(request, item, answers[cursor:cursor + n]))
            cursor += n
        self.sink.flush()
        return replies

    def _answer(self, x: np.ndarray) -> tuple[Sequence[Any] | None, str]:
        raise NotImplementedError

    def _reply(self, request: Request, decoded: Decoded, answers: Sequence[Any]) -> Reply:
        raise NotImplementedError

    def _body(self, decoded: Decoded, answers: list[dict[str, Any]]) -> dict[str, Any]:
        """The reply body in the request's protocol."""
        if decoded.protocol == V2:
            return v2_body(self.model_name, answers, request_id=decoded.request_id)
        return {"predictions": answers}


class GuardService(_BatchService):
    """A guarded model answering batches of requests: decode, ``Guard.run``, policy, status, audit, metrics.

    Build it from an unpacked archive (what ``guard archive`` wrote) and hand it requests:

    >>> import yaml
    >>> from guard.serving.service import GuardService, Request
    >>> config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    >>> service = GuardService.from_archive_config(model_dir, config, model_name="demo")
    >>> image = [[[0.5] * 32] * 32] * 3  # one 3x32x32 image in [0, 1]
    >>> (reply,) = service.handle([Request({"instances": [image]}, content_type="application/json")])
    >>> reply.status in (200, 403), sorted(reply.body["predictions"][0])
    (True, ['label', 'probabilities', 'reasons', 'scores', 'verdict'])
    >>> service.handle([Request(b"{not json", content_type="application/json")])[0].status
    400
    >>> service.close()

    ``sink`` receives the counters (nothing is counted without one); ``audit`` is the trail (none: no
    trail); ``fail_open`` answers the bare model, marked, when the guard itself fails.
    """

    def __init__(self, guard: Guard, *, fail_open: bool = False,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, audit: AuditLog | None = None,
                 sink: MetricsSink | None = None, model_name: str = ""):
        self.guard = guard
        self.input_shape = guard.input_shape
        self.fail_open = bool(fail_open)
        self.max_request_bytes = int(max_request_bytes)
        self.audit = audit
        self.sink = sink if sink is not None else NullSink()
        self.model_name = model_name
        self._session = contextlib.ExitStack()

    # ------------------------------------------------------------------ load
    @classmethod
    def from_archive_config(cls, model_dir: str | Path, config: Any, *, manifest: Mapping[str, Any] | None = None,
                            model_name: str = "", sink: MetricsSink | None = None) -> GuardService:
        """Load the archive unpacked in ``model_dir`` (``config``: its model-config.yaml) and start serving it.

        Raises on anything wrong (no model file, bad mode or bound, a profile edited after archiving,
        built for another model, missing or truncated, an audit log that cannot be opened) after one
        ``GUARD REFUSED TO LOAD`` error line. ``fail_open`` is logged as a WARNING at every load.
        """
        try:
            service = cls._load(Path(model_dir), config, manifest=manifest, model_name=model_name, sink=sink)
        except Exception as e:
            logger.error("%s model %s: %s: %s (the model is not served unguarded)", REFUSAL_MARK, model_name,
                         type(e).__name__, e)
            raise
        if service.fail_open:
            logger.warning("GUARD FAIL-OPEN: model %s was archived with --fail-open: if the guard itself fails "
                           "on a batch, the bare model's answers are served UNGUARDED (verdict=error) instead of "
                           "503; re-archive without --fail-open to fail closed", model_name)
        guard = service.guard
        logger.info("guard: model %s loaded, mode %s, fail_open %s, suspect labels %s, checks %s, audit log %s",
                    model_name, guard.mode, service.fail_open, guard.profile.suspect_labels, ",".join(guard.names),
                    service.audit.path if service.audit else None)
        return service

    @classmethod
    def _load(cls, model_dir: Path, config: Any, *, manifest: Mapping[str, Any] | None, model_name: str,
              sink: MetricsSink | None) -> GuardService:
        cfg = ArchiveConfig.parse(config, manifest=manifest)
        mode = validate_mode(cfg.mode)
        model = cfg.load_model(model_dir)
        profile_dir = model_dir / cfg.profile
        if profile_dir.is_dir():  # a missing directory is Profile.load's clear error
            verify_profile_digest(profile_dir, cfg.profile_sha256)
        profile = Profile.load(profile_dir, model_sha256=fingerprint(model))
        guard = Guard(model, profile, mode=mode, verify=False)
        try:
            audit = AuditLog.from_config(cfg.section, model=model_name or "model", model_sha256=profile.model_sha256,
                                         mode=mode, model_dir=model_dir)
        except (OSError, ValueError, TypeError) as e:
            raise GuardError(f"cannot open the audit log: {e}") from None
        if sink is not None:
            sink = BatchedSink(sink, interval=cfg.metrics_flush_seconds)
        service = cls(guard, fail_open=cfg.fail_open, max_request_bytes=cfg.max_request_bytes, audit=audit,
                      sink=sink, model_name=model_name)
        try:
            service.start()
        except BaseException:
            service.close()
            raise
        return service

    def start(self) -> GuardService:
        """Hold the guard's feature hook for the service's life (one per worker, not one per batch) and run
        one warm-up input, so the first client does not pay for compiling the batch-1 kernel."""
        self._session.close()
        self._session.enter_context(self.guard.session())
        self.guard.warmup()
        return self

    def close(self) -> None:
        """Report the buffered counts, release the feature hook and close the audit trail."""
        self.sink.flush(force=True)
        self._session.close()
        if self.audit is not None:
            self.audit.close()

    def __enter__(self) -> GuardService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ serve
    def _answer(self, x: np.ndarray) -> tuple[Sequence[Decision] | None, str]:
        try:
            result = self.guard.run(x)
            decisions = result.decisions
        except Exception as e:  # the guard's own failure, not bad input (inputs were validated)
            logger.exception("guard: checking a batch of %d failed", len(x))
            failure = type(e).__name__  # details go to the model log, not to clients
            if self.fail_open:
                try:
                    return [Decision(label, p, "error", ["guard_error"], {})
                            for label, p in bare_predictions(self.guard.model, x)], failure
                except Exception:  # the model itself failed too: nothing to answer with
                    logger.exception("guard: fail_open could not run the bare model either")
            return None, failure
        self.sink.latency(result.guard_ms / 1e3)
        return decisions, ""

    def _reply(self, request: Request, decoded: Decoded, answers: Sequence[Decision]) -> Reply:
        count_decisions(self.sink, answers)
        status = 403 if len(answers) == 1 and answers[0].verdict == "rejected" else 200
        out = [d.to_dict() for d in answers]
        if self.audit is not None:
            self._audit(request.request_id, status, out, decoded.x)
        return Reply(status, self._body(decoded, out))

    def _audit(self, request_id: str | None, status: int, answers: list[dict[str, Any]], x: np.ndarray) -> None:
        """One audit line per non-pass instance, with exactly the fields the client is sent."""
        for j, answer in enumerate(answers):
            if answer["verdict"] == "pass":
                continue
            try:
                self.audit.write(request_id=request_id, instance=j, status=status, decision=answer, payload=x[j])
            except Exception:  # the trail must not turn an answer into a 5xx
                logger.exception("guard: audit line for request %s not written", request_id)


class BaselineService(_BatchService):
    """The unguarded baseline: :class:`GuardService`'s request path with one bare forward pass instead of the
    guard; answers ``{"predictions": [{label, probabilities}]}``. Reads the same model-config section
    (the profile only for its input shape; mode and fail_open are ignored)."""

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int], *,
                 max_request_bytes: int = TORCHSERVE_MAX_REQUEST_SIZE, model_name: str = ""):
        self.model = model.eval()
        self.model_name = model_name
        self.input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
        self.max_request_bytes = int(max_request_bytes)
        self.sink = NullSink()

    @classmethod
    def from_archive_config(cls, model_dir: str | Path, config: Any, *, manifest: Mapping[str, Any] | None = None,
                            model_name: str = "") -> BaselineService:
        """Load the model of the archive unpacked in ``model_dir`` (weights only); no profile checks."""
        model_dir = Path(model_dir)
        cfg = ArchiveConfig.parse(config, manifest=manifest, default_max_request_bytes=TORCHSERVE_MAX_REQUEST_SIZE)
        meta = json.loads((model_dir / cfg.profile / "profile.json").read_text())
        return cls(cfg.load_model(model_dir), tuple(meta["input_shape"]), max_request_bytes=cfg.max_request_bytes,
                   model_name=model_name)

    def _answer(self, x: np.ndarray) -> tuple[Sequence[dict[str, Any]], str]:
        return [{"label": label, "probabilities": p} for label, p in bare_predictions(self.model, x)], ""

    def _reply(self, request: Request, decoded: Decoded, answers: Sequence[dict[str, Any]]) -> Reply:
        return Reply(200, self._body(decoded, list(answers)))


__all__ = ["ArchiveConfig", "BaselineService", "GuardService", "Reply", "Request",
           "handler_section", "v2_body"]
