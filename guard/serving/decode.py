"""Request decoding and validation, shared by the TorchServe handler and the CLI.

:func:`decode_payload` turns what a client sent into the batch the model takes, float32 ``(N, C, H, W)`` in
[0, 1], and says which protocol the answer must follow (:func:`decode_request` returns the batch alone).
It accepts the request forms of the HTTP contract (docs/design.md): JSON ``{"instances": [x, ...]}`` with each
``x`` a C x H x W nested list (TorchServe's ``/predictions`` and KServe v1's ``/v1/models/NAME:predict``);
the Open Inference Protocol (KServe v2, ``/v2/models/NAME/infer``) body ``{"inputs": [{"name", "shape": [N,
C, H, W], "datatype": "FP32", "data": [...]}]}`` with ``data`` flat in row-major order or nested; one
PNG/JPEG image as the whole body; and a ``multipart/form-data`` upload (``curl -F data=@image.png``)
whose ``data`` (or ``body``, else first) part is one of those, recognised by its content even when an
ingress forwarded it as ``application/octet-stream``. Everything a client can get wrong raises
:class:`~guard.errors.InputError` (HTTP 400) with a message naming what was expected, or
:class:`~guard.errors.PayloadTooLarge` (HTTP 413) above the size bound; nothing a client sends may end
in another exception (a 5xx), which the property test in ``tests/test_io.py`` checks on arbitrary bytes and JSON.

Images of another size than the model's input are rejected, not resized: resizing changes what the
checks see (a 3x3 trigger can vanish or smear under interpolation), so the caller decides how to
scale, and the message says which size is expected.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard.errors import InputError, PayloadTooLarge
from guard.inputs import validate_batch

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
V2_DATATYPES = ("FP32", "FP64", "FP16")  # v2 tensor types a float input may come as
_MULTIPART_START = re.compile(rb"\A\s*--([\x21-\x7e]{1,70})\r?\n")
MULTIPART_FIELDS = ("data", "body")  # the part names TorchServe's handlers read, in order

INSTANCES = "instances"  # {"instances": [...]} (TorchServe, KServe v1) or an image: {"predictions": [...]}
V2 = "v2"  # Open Inference Protocol: {"model_name", "outputs": [...]}


@dataclass(frozen=True)
class Decoded:
    """A decoded request: the batch, the protocol its answer follows (:data:`INSTANCES` or :data:`V2`) and,
    for v2, the request's ``id`` (echoed in the answer) and its input's name."""

    x: np.ndarray
    protocol: str = INSTANCES
    request_id: str | None = None
    input_name: str | None = None

    def __len__(self) -> int:
        return len(self.x)


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
    client can get wrong: empty, not JSON, no ``instances`` (nor v2 ``inputs``), wrong shape, NaN/inf, out
    of [0, 1], unreadable image, image of another size or an unsupported content type.
    """
    return decode_payload(body, content_type, input_shape=input_shape, max_bytes=max_bytes).x


def decode_payload(body: bytes | bytearray | memoryview | str | dict | list | None,
                   content_type: str | None, *, input_shape: tuple[int, int, int],
                   max_bytes: int) -> Decoded:
    """:func:`decode_request`, keeping which protocol the request used (and a v2 request's ``id``)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")  # caller bug, not input
    ctype = _media_type(content_type)
    if body is None:
        raise InputError("empty request body: send JSON {\"instances\": [...]} or a PNG/JPEG image")
    if isinstance(body, (dict, list)):
        if ctype in IMAGE_TYPES:
            raise InputError(f"Content-Type is {ctype} but the body is JSON")
        return _decode_json(body, shape, max_bytes=max_bytes, parsed=True)
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass") if body else b""
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise InputError(f"unsupported request body of type {type(body).__name__}")
    raw = bytes(body)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is {len(raw)} bytes, above the limit of {max_bytes} bytes")
    if not raw.strip():
        raise InputError("empty request body: send JSON {\"instances\": [...]} or a PNG/JPEG image")
    if (ctype.startswith("multipart/") or ctype in GENERIC_TYPES) and _MULTIPART_START.match(raw):
        raw, part_type = _multipart_part(raw)
        ctype = part_type if part_type in JSON_TYPES or part_type in IMAGE_TYPES else ""
        if not raw.strip():
            raise InputError("the multipart upload's data part is empty")
    kind = _kind(ctype, raw)
    if kind == "image":
        return Decoded(_decode_image(raw, shape))
    return _decode_json(_parse_json(raw), shape, max_bytes=max_bytes, parsed=False)


def _multipart_part(raw: bytes) -> tuple[bytes, str]:
    """The ``data`` (else ``body``, else first) part of a ``multipart/form-data`` body and its media type.
    The boundary is the body's own first line (a forwarded body may have lost its Content-Type)."""
    from email.parser import BytesHeaderParser
    from email.policy import HTTP

    m = _MULTIPART_START.match(raw)
    assert m is not None
    delimiter = b"\r\n--" + m.group(1)
    chunks = (b"\r\n" + raw[m.start(1) - 2:]).split(delimiter)[1:]
    parts: list[tuple[str, bytes, str]] = []
    for chunk in chunks:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InputError("malformed multipart upload: a part has no blank line after its headers")
        try:
            headers = BytesHeaderParser(policy=HTTP).parsebytes(head.lstrip(b" \t\r\n") + b"\r\n\r\n")
            disposition = headers.get("content-disposition")
            name = str(disposition.params.get("name") or "") if disposition is not None else ""
            ptype = _media_type(str(headers.get("content-type") or ""))
        except Exception:  # email's parser raises several types on hostile headers
            raise InputError("malformed multipart upload: unreadable part headers") from None
        parts.append((name, payload, ptype))
    if not parts:
        raise InputError("malformed multipart upload: no part found (send the image or JSON as the field "
                         "\"data\")")
    by_name = {name: (payload, ptype) for name, payload, ptype in reversed(parts)}
    for field in MULTIPART_FIELDS:
        if field in by_name:
            return by_name[field]
    return parts[0][1], parts[0][2]


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


def _decode_json(payload: Any, shape: tuple[int, int, int], *, max_bytes: int, parsed: bool) -> Decoded:
    """``{"instances": [...]}`` or a v2 ``{"inputs": [...]}`` -> :class:`Decoded`."""
    if not isinstance(payload, dict):
        raise InputError(f"request JSON must be an object {{\"instances\": [...]}} (or v2 {{\"inputs\": [...]}}), "
                         f"got {type(payload).__name__}")
    if "instances" not in payload and "inputs" in payload:
        return _decode_v2(payload, shape, max_bytes=max_bytes, parsed=parsed)
    return Decoded(_decode_instances(payload, shape, max_bytes=max_bytes, parsed=parsed))


def _decode_v2(payload: dict, shape: tuple[int, int, int], *, max_bytes: int, parsed: bool) -> Decoded:
    """An Open Inference Protocol request: one FP32 input of shape ``[N, C, H, W]``, data flat or nested."""
    expected = "x".join(str(s) for s in shape)
    rid = payload.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InputError(f"\"id\" must be a string, got {type(rid).__name__}")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError("\"inputs\" must be a list of one tensor {\"name\", \"shape\", \"datatype\", \"data\"}: "
                         "the model has one input")
    tensor = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise InputError(f"the input tensor has no {', '.join(repr(k) for k in missing)}")
    name, dims, datatype, data = tensor["name"], tensor["shape"], tensor["datatype"], tensor["data"]
    if not isinstance(name, str):
        raise InputError("the input tensor's \"name\" must be a string")
    if datatype not in V2_DATATYPES:
        raise InputError(f"datatype {str(datatype)[:20]!r} is not supported: send FP32 values in [0, 1]")
    if (not isinstance(dims, list) or len(dims) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims)):
        raise InputError(f"\"shape\" must be [N, {', '.join(str(s) for s in shape)}] (batch, channels, height, "
                         f"width), got {str(dims)[:80]}")
    n = dims[0]
    if n < 1 or tuple(dims[1:]) != shape:
        raise InputError(f"\"shape\" is {dims}; the model takes [N, {', '.join(str(s) for s in shape)}] with N >= 1 "
                         f"({expected} per instance)")
    if parsed and n * math.prod(shape) * _MIN_JSON_BYTES_PER_VALUE > max_bytes:
        raise PayloadTooLarge(f"{n} instances of {expected} values cannot fit in the limit of {max_bytes} bytes")
    if not isinstance(data, list) or not data:
        raise InputError("\"data\" must be a non-empty list of numbers (flat, row-major, or nested as \"shape\")")
    got = _shape_of(data)
    if got not in ((n * math.prod(shape),), tuple(dims)):
        raise InputError(f"\"data\" holds {_describe(got)} values; \"shape\" {dims} needs {n * math.prod(shape)} "
                         "(flat) or nested as the shape")
    try:
        x = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        raise InputError(f"\"data\" is not a regular array of numbers: {str(e)[:200]}") from None
    if x.dtype.kind == "b" or x.dtype.kind not in "fiu":
        raise InputError(f"\"data\" must hold numbers in [0, 1]; found values of type {x.dtype}")
    batch = validate_batch(x.reshape(n, *shape), shape=shape, what="data")
    return Decoded(batch, V2, rid, name)


def _decode_instances(payload: dict, shape: tuple[int, int, int], *, max_bytes: int,
                      parsed: bool) -> np.ndarray:
    """``{"instances": [x, ...]}`` -> validated batch; each x a C x H x W nested list of numbers.

    Each instance's shape is read along its first elements; numpy then refuses anything irregular below
    (a ragged or deeper list elsewhere raises ValueError, strings, None or objects give a non-numeric
    dtype), so nothing walks every element in Python: such a walk would be most of the decoding time of a
    32x32x3 JSON instance (docs/benchmarks.md, 'Serving cost').
    """
    expected = "x".join(str(s) for s in shape)
    if "instances" not in payload:
        keys = ", ".join(sorted(str(k) for k in payload)[:5]) or "none"
        raise InputError(f"request JSON has no \"instances\" (keys: {keys}); send {{\"instances\": [...]}} or a v2 "
                         "{\"inputs\": [...]}")
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
    if len(shape) > 8:
        return f"{'x'.join(str(s) for s in shape[:4])}x... (lists nested {len(shape)} deep)"
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
