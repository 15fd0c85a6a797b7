"""TorchServe's request context to :mod:`guard.serving` and back, by duck typing (``ts`` imported only to fail a batch).

TorchServe hands a handler a ``context`` (model-config.yaml, the model directory, per-request headers
and ids, response status setters) and one ``row`` per request. :func:`requests` turns a batch into
:class:`~guard.serving.service.Request` objects, :func:`apply` writes each
:class:`~guard.serving.service.Reply`'s status and content type back (``context.set_response_status(code,
phrase, idx)``) and returns the bodies TorchServe serialises, and :func:`load_arguments` is what a
service's ``from_archive_config`` needs; the guarded and the baseline handler are these three calls
around a service (:func:`answer`). TorchServe is imported only to report a gRPC client error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guard.serving.service import Reply, Request

PHRASES = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


def load_arguments(context: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The unpacked archive's directory, its model-config.yaml and its MANIFEST, from a worker's context."""
    props = getattr(context, "system_properties", None) or {}
    config = getattr(context, "model_yaml_config", None) or {}
    return Path(props.get("model_dir") or "."), config, getattr(context, "manifest", None) or {}


def requests(context: Any, rows: Sequence[Any]) -> list[Request]:
    """One :class:`Request` per row of a TorchServe batch: body, headers, id and the body's content type."""
    out = []
    for idx, row in enumerate(rows):
        headers = request_headers(context, idx)
        out.append(Request(request_body(row), headers, request_id(context, idx), content_type(headers, row)))
    return out


def apply(context: Any, replies: Sequence[Reply]) -> list[Any]:
    """Set each reply's status (when not 200) and content type on the context; the bodies, in order."""
    if getattr(context, "request_processor", None) is not None:
        for idx, reply in enumerate(replies):
            context.set_response_content_type(idx, reply.content_type)
            if reply.status != 200:
                context.set_response_status(reply.status, PHRASES.get(reply.status, ""), idx)
    return [reply.body for reply in replies]


def is_grpc(request: Request) -> bool:
    """True for a request from TorchServe's gRPC API: it carries no HTTP header at all, only the input
    map's per-entry metadata (dict values); an HTTP request with a body has at least its length."""
    return not any(isinstance(v, (str, bytes)) for v in request.headers.values())


def grpc_error(requests_: Sequence[Request], replies: Sequence[Reply]) -> tuple[int, str] | None:
    """The client error to fail a batch with so that a gRPC client gets a gRPC error status with the message.

    TorchServe's gRPC API drops per-request statuses (a 400 set with ``set_response_status`` arrives as a
    normal response carrying the JSON body); only a failed batch becomes a gRPC error, and it fails every
    request of the batch. So only a batch of one gRPC request whose reply is a 400 or 413 gets one.
    """
    if len(requests_) == 1 and len(replies) == 1 and replies[0].status in (400, 413) and is_grpc(requests_[0]):
        return replies[0].status, str(replies[0].body.get("error", "bad request"))
    return None


def answer(context: Any, service: Any, rows: Sequence[Any]) -> list[Any]:
    """A handler's whole ``handle``: rows to requests, the service's replies applied to the context; a lone
    gRPC request with a client error fails the batch with TorchServe's ``PredictionException`` (its status
    and message become the gRPC error), the only way TorchServe's gRPC API reports one."""
    reqs = requests(context, rows)
    replies = service.handle(reqs)
    failed = grpc_error(reqs, replies)
    if failed is not None:
        from ts.utils.util import PredictionException  # inside a TorchServe worker only

        raise PredictionException(failed[1], failed[0])
    return apply(context, replies)


def request_body(row: Any) -> Any:
    """The payload of one request: TorchServe names a raw body ``body`` (form fields keep their names)."""
    if not isinstance(row, dict):
        return row
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    values = [v for v in row.values() if v is not None]
    return values[0] if values else None


def request_headers(context: Any, idx: int) -> dict[str, Any]:
    """Request ``idx``'s headers, or ``{}`` outside a TorchServe request."""
    try:
        return dict(context.get_all_request_header(idx) or {})
    except Exception:  # no request processor (not inside a TorchServe request)
        return {}


def content_type(headers: dict[str, Any], row: Any) -> str | None:
    """The body parameter's content type if TorchServe recorded one (a multipart part's); None otherwise,
    and the service reads the HTTP ``Content-Type`` header from ``headers`` itself."""
    if isinstance(row, dict):
        for name in ("body", "data", *row.keys()):
            part = headers.get(name)
            if isinstance(part, dict) and part.get("content-type"):
                return str(part["content-type"])
    return None


def request_id(context: Any, idx: int) -> str | None:
    """TorchServe's id of request ``idx``: the audit log's key. The frontend returns the same id to the
    client as the ``x-request-id`` response header, so a client's complaint finds its audit line."""
    try:
        rid = context.get_request_id(idx)
    except Exception:  # no id map (not inside a TorchServe request)
        return None
    return None if rid is None else str(rid)
