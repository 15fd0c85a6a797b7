"""Request decoding and validation, shared by the TorchServe handler and the CLI.

One function, :func:`decode_request`, turns what a client sent into the batch the model takes:
float32 ``(N, C, H, W)`` in [0, 1]. It accepts the two request forms of the HTTP contract
(DESIGN.md): JSON ``{"instances": [x, ...]}`` with each ``x`` a C x H x W nested list, or one PNG/JPEG
image as the whole body. Everything a client can get wrong raises :class:`~guard.errors.InputError`
(HTTP 400) with a message naming what was expected, or :class:`~guard.errors.PayloadTooLarge` (HTTP
413) above the size bound; nothing a client sends may end in another exception (a 5xx), which the
property test in ``tests/test_io.py`` checks on arbitrary bytes and JSON.

Images of another size than the model's input are rejected, not resized: resizing changes what the
checks see (a 3x3 trigger can vanish or smear under interpolation), so the caller decides how to
scale, and the message says which size is expected.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from guard.errors import InputError, PayloadTooLarge
from guard.online.inputs import validate_batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
JSON_TYPES = ("application/json", "text/json")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/pjpeg")
# Content types that say nothing about the body: decide by sniffing its first bytes.
GENERIC_TYPES = ("", "application/octet-stream", "text/plain", "application/x-www-form-urlencoded")
# A JSON number takes at least two bytes in a list ("0,"): the smallest body that could carry a
# parsed JSON payload, used to apply max_bytes when TorchServe already decoded the JSON for us.
_MIN_JSON_BYTES_PER_VALUE = 2
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_MAX_JSON_DEPTH = 64


def decode_request(body: bytes | bytearray | memoryview | str | dict | list | None,
                   content_type: str | None, *, input_shape: tuple[int, int, int],
                   max_bytes: int) -> np.ndarray:
    """Decode one request body into a validated float32 batch ``(N, C, H, W)`` in [0, 1].

    ``body`` is what TorchServe hands the handler: raw bytes, text, or (for ``application/json``,
    which TorchServe parses itself) a dict or list. ``content_type`` picks JSON or image decoding;
    when it is missing or generic the body's first bytes decide. ``input_shape`` is the model's
    ``(C, H, W)``; ``max_bytes`` bounds the body size (for an already-parsed JSON body, the smallest
    JSON text that could carry it).

    Raises :class:`PayloadTooLarge` above ``max_bytes`` and :class:`InputError` for anything else a
    client can get wrong: empty, not JSON, no ``instances``, wrong shape, NaN/inf, out of [0, 1],
    unreadable image, image of another size or an unsupported content type.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")  # caller bug, not input
    ctype = _media_type(content_type)
    if body is None:
        raise InputError("empty request body: send JSON {\"instances\": [...]} or a PNG/JPEG image")
    if isinstance(body, (dict, list)):
        if ctype in IMAGE_TYPES:
            raise InputError(f"Content-Type is {ctype} but the body is JSON")
        return _decode_instances(body, shape, max_bytes=max_bytes, parsed=True)
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass") if body else b""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise InputError(f"unsupported request body of type {type(body).__name__}")
    raw = bytes(body)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes, above the limit of {max_bytes} bytes")
    if not raw.strip():
        raise InputError("empty request body: send JSON {\"instances\": [...]} or a PNG/JPEG image")
    kind = _kind(ctype, raw)
    if kind == "image":
        return _decode_image(raw, shape)
    return _decode_instances(_parse_json(raw), shape, max_bytes=max_bytes, parsed=False)


def _media_type(content_type: str | None) -> str:
    """``"Image/PNG; charset=x"`` -> ``"image/png"``; ``None`` -> ``""``."""
    if not content_type or not isinstance(content_type, str):
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _kind(ctype: str, raw: bytes) -> str:
    """``"json"`` or ``"image"`` from the content type, or from the body when the type is generic."""
    if ctype in JSON_TYPES or ctype.endswith("+json"):
        return "json"
    if ctype in IMAGE_TYPES:
        return "image"
    if ctype in GENERIC_TYPES or ctype.startswith("multipart/"):
        if raw.startswith(PNG_MAGIC) or raw.startswith(JPEG_MAGIC):
            return "image"
        if raw.lstrip()[:1] in (b"{", b"["):
            return "json"
        raise InputError("cannot tell the request format: send Content-Type application/json with "
                         "{\"instances\": [...]}, or image/png or image/jpeg")
    raise InputError(f"unsupported Content-Type {ctype!r}: use application/json, image/png or image/jpeg")


def _parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"request body is not UTF-8 JSON: {e.reason} at byte {e.start}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError("request JSON is nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError, and int() limits on huge integer literals
        raise InputError(f"request body is not valid JSON: {str(e)[:200]}") from None


def _depth_ok(obj: Any, limit: int) -> bool:
    """True when lists nest at most ``limit`` deep (iterative, so hostile nesting cannot recurse)."""
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            if depth >= limit:
                return False
            stack.extend((child, depth + 1) for child in node if isinstance(child, list))
    return True


def _decode_instances(payload: Any, shape: tuple[int, int, int], *, max_bytes: int,
                      parsed: bool) -> np.ndarray:
    """``{"instances": [x, ...]}`` -> validated batch; each x a C x H x W nested list of numbers."""
    expected = "x".join(str(s) for s in shape)
    if not isinstance(payload, dict):
        raise InputError(f"request JSON must be an object {{\"instances\": [...]}}, got {type(payload).__name__}")
    if "instances" not in payload:
        keys = ", ".join(sorted(str(k) for k in payload)[:5]) or "none"
        raise InputError(f"request JSON has no \"instances\" (keys: {keys})")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InputError(f"\"instances\" must be a list of {expected} nested lists, "
                         f"got {type(instances).__name__}")
    if not instances:
        raise InputError("\"instances\" is empty")
    per_instance = math.prod(shape)
    if parsed and len(instances) * per_instance * _MIN_JSON_BYTES_PER_VALUE > max_bytes:
        raise PayloadTooLarge(f"{len(instances)} instances of {expected} values cannot fit in the limit "
                              f"of {max_bytes} bytes")
    if not _depth_ok(instances, _MAX_JSON_DEPTH):
        raise InputError("\"instances\" is nested too deeply")
    for i, inst in enumerate(instances):
        got = _shape_of(inst)
        if got != shape:
            raise InputError(f"instance {i} has shape {_describe(got)}; the model takes {expected} "
                             f"(channels x height x width) nested lists of numbers in [0, 1]")
    try:
        x = np.array(instances)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        raise InputError(f"\"instances\" is not a regular array of numbers: {str(e)[:200]}") from None
    if x.dtype.kind == "b":
        raise InputError("\"instances\" holds booleans; send numbers in [0, 1]")
    if x.dtype.kind not in "fiu":
        raise InputError(f"\"instances\" must hold numbers in [0, 1]; found values of type {x.dtype}")
    return validate_batch(x, shape=shape, what="instances")


def _shape_of(obj: Any) -> tuple[int, ...] | None:
    """Shape of a regular nested list of non-list leaves (first elements followed); None if ragged."""
    dims = []
    node = obj
    while isinstance(node, list):
        dims.append(len(node))
        if not node:
            break
        node = node[0]
    return tuple(dims)


def _describe(shape: tuple[int, ...] | None) -> str:
    if not shape:
        return "() (a single value, not a nested list)"
    return "x".join(str(s) for s in shape)


def _decode_image(raw: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """One PNG/JPEG -> ``(1, C, H, W)``; the size must be the model's, checked before decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    mode = _PIL_MODES.get(c)
    if mode is None:
        raise InputError(f"the model takes {c}-channel input, which images cannot carry: send JSON instances")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in ("PNG", "JPEG", "MPO"):
                raise InputError(f"image format {im.format} is not supported: send PNG or JPEG")
            if im.size != (w, h):
                raise InputError(f"image is {im.size[0]}x{im.size[1]} (width x height); the model takes "
                                 f"{w}x{h} images: resize it before sending")
            im.seek(0)
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError("request body is not a readable PNG or JPEG image") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad data
        raise InputError(f"cannot decode the image: {type(e).__name__}: {str(e)[:200]}") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return validate_batch(np.ascontiguousarray(arr)[None], shape=shape, what="image")
