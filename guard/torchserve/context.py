"""Reading a TorchServe request context without importing ``ts``: the handlers' shared glue.

TorchServe hands a handler a ``context`` (model-config.yaml, per-request headers and ids, response
status setters) and one ``row`` per request. These helpers read and write them by duck typing, so the
guarded and the baseline handler decode requests the same way, and the tests drive them with a
stand-in context (``guard`` never imports ``ts`` outside ``handlers/``, DESIGN.md).
"""

from __future__ import annotations

from typing import Any

PHRASES = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


def handler_config(context: Any) -> dict[str, Any]:
    """The ``handler:`` section of the archive's model-config.yaml (top-level keys as a fallback)."""
    cfg = getattr(context, "model_yaml_config", None) or {}
    if not isinstance(cfg, dict):
        return {}
    section = cfg.get("handler")
    return dict(section) if isinstance(section, dict) else dict(cfg)


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


def content_length(headers: dict[str, Any]) -> int | None:
    """The declared body size, or ``None`` when absent or not a number."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "content-length":
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def set_status(context: Any, idx: int, code: int) -> None:
    """Answer request ``idx`` with HTTP ``code`` (no-op outside a TorchServe request)."""
    if getattr(context, "request_processor", None) is not None:
        context.set_response_status(code, PHRASES.get(code, ""), idx)


def set_json(context: Any, idx: int) -> None:
    """Mark request ``idx``'s response as JSON (no-op outside a TorchServe request)."""
    if getattr(context, "request_processor", None) is not None:
        context.set_response_content_type(idx, "application/json")


def request_id(context: Any, idx: int) -> str | None:
    """TorchServe's id of request ``idx``: the audit log's key. The frontend returns the same id to the
    client as the ``x-request-id`` response header, so a client's complaint finds its audit line."""
    try:
        rid = context.get_request_id(idx)
    except Exception:  # no id map (not inside a TorchServe request)
        return None
    return None if rid is None else str(rid)
