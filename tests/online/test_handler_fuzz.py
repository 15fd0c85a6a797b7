"""Hostile input against the guarded handler, in-process, through TorchServe's own worker code.

Hypothesis draws whole batches of hostile requests (arbitrary bytes, truncated or huge JSON, wrong
nesting, shapes and channel counts, NaN/inf, values outside [0, 1], mismatched content types, images of
the wrong size, mode or format, damaged images, empty bodies, lying Content-Length headers, extra
form fields). Each batch is framed exactly as the frontend frames it and decoded by TorchServe's
``otf_message_handler`` (so ``application/json`` bodies arrive parsed and ``text/*`` ones as str, as
they really do), then runs through ``Service.predict``. Every request must end in 200, 400, 403 or
413 with a JSON body of the contract's shape (never a 5xx, never a batch-level failure), and a clean
canary request in every batch must still be answered ``pass`` with the offline guard's label: a
hostile neighbour neither kills the worker nor changes another request's answer.

The real-TorchServe sample of the same traffic is in tests/integration/test_load.py.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("ts")

from test_handler import NAME, decode_reply, load_service, png, variant  # noqa: E402  (tests/online helpers)
from ts.protocol.otf_message_handler import _retrieve_inference_msg  # noqa: E402

from guard import Guard, Profile, load_model  # noqa: E402
from guard.data import load_npz  # noqa: E402
from guard.torchserve.archive import make_archive  # noqa: E402

SHAPE = (3, 32, 32)
MAX_BYTES = 40_000  # small, so hypothesis reaches 413 with small bodies
ALLOWED = {200, 400, 403, 413}
FIELDS = {"label", "probabilities", "verdict", "reasons", "scores"}
CTYPES = [None, "", "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/json",
          "application/vnd.x+json", "image/png", "image/jpeg", "image/gif", "text/plain", "text/html",
          "application/octet-stream", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
          "application/xml", "x/y", ";;", "image/png; x=1"]


# ---------------------------------------------------------------- the frontend's framing


class _Wire:
    """A byte stream with ``recv`` (what ``otf_message_handler`` reads the worker socket through)."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self._buf.read(n)


def _blob(b: bytes) -> bytes:
    return struct.pack("!i", len(b)) + b


def frame(requests: list[dict]) -> bytes:
    """The inference message the frontend sends: per request its id, headers and parameters."""
    out = b""
    for r in requests:
        out += _blob(r["id"].encode())
        for name, value in r["headers"]:
            out += _blob(name.encode()) + _blob(value.encode("latin-1"))
        out += struct.pack("!i", -1)
        for name, ctype, value in r["params"]:
            out += _blob(name.encode()) + _blob((ctype or "").encode()) + _blob(value)
        out += struct.pack("!i", -1)
    return out + struct.pack("!i", -1)


def request(rid: str, body: bytes, ctype: str | None, *, content_length: str | None = "auto",
            extra_params: tuple = ()) -> dict:
    headers = []
    if content_length is not None:
        headers.append(("Content-Length", str(len(body)) if content_length == "auto" else content_length))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    headers.append(("Authorization", "Bearer not-a-real-key"))
    return {"id": rid, "headers": headers, "params": [("body", ctype, body), *extra_params]}


def serve(service, requests: list[dict]) -> list[dict]:
    """Frame, decode with TorchServe's own reader, predict, decode the reply per request."""
    batch = _retrieve_inference_msg(_Wire(frame(requests)))
    raw = bytes(service.predict(batch))
    (batch_code,) = struct.unpack_from("!i", raw, 0)
    assert batch_code == 200, f"batch-level failure {batch_code}: {raw[:300]!r}"
    return decode_reply(raw)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(demo_world, demo_profile, tmp_path_factory):
    """The demo archive with a small request bound, loaded once for the module as a worker loads it."""
    export = tmp_path_factory.mktemp("fuzz-mar")
    mar, _ = make_archive(name=NAME, model_file=demo_world.model_file, weights=demo_world.weights,
                          profile=demo_profile, export_path=export, mode="enforce", batch_size=8,
                          max_request_bytes=MAX_BYTES)
    base = tmp_path_factory.mktemp("fuzz-unpacked") / NAME
    with zipfile.ZipFile(mar) as z:
        z.extractall(base)
    with pytest.MonkeyPatch.context() as mp:
        svc = load_service(base, mp)
        yield svc


class Canary(dict):
    """The canary's data, with a short repr (hypothesis prints fixtures of a failing example)."""

    def __repr__(self) -> str:
        return f"Canary(label={self['label']}, body={len(self['body'])} bytes)"


@pytest.fixture(scope="module")
def canary(demo_world, demo_profile) -> Canary:
    """One clean held-out image the offline guard passes, as a JSON body (3 decimals, well under
    MAX_BYTES), with its expected label; plus a few clean and triggered images for the other tests."""
    guard = Guard(load_model(demo_world.model_file, demo_world.weights), Profile.load(demo_profile))
    xh, _ = load_npz(demo_world.holdout)
    xt, _ = load_npz(demo_world.triggered)
    x = np.round(xh[:8].astype(np.float64), 3)  # float64: tolist() then prints "0.438", not float32 noise
    d = guard.predict(x.astype(np.float32))
    i = next(i for i, di in enumerate(d) if di.verdict == "pass")
    body = json.dumps({"instances": [x[i].tolist()]}).encode()
    assert len(body) < MAX_BYTES
    return Canary(body=body, label=d[i].label, clean=xh[:8], triggered=np.round(xt[:4].astype(np.float64), 3))


# ---------------------------------------------------------------- hostile bodies

_SPECIAL = [float("nan"), float("inf"), -float("inf"), -1e-9, 1.0000001, 2.0, -0.5, 1e308, True, None, "0.5",
            [0.5], {"a": 1}]


@st.composite
def shaped_json(draw) -> bytes:
    """``{"instances": ...}`` of a drawn shape (often near 3x32x32) with drawn poisoned values."""
    n = draw(st.integers(0, 3))
    c = draw(st.sampled_from([0, 1, 2, 3, 4]))
    h = draw(st.sampled_from([0, 1, 31, 32, 33]))
    w = draw(st.sampled_from([1, 31, 32, 33]))
    depth = draw(st.sampled_from(["ok", "flat", "extra", "scalar"]))
    x = np.full((n, c, h, w), draw(st.sampled_from([0.0, 0.25, 1.0])), dtype=np.float64)
    inst: object = x.tolist()
    if depth == "flat":
        inst = x.reshape(n, c * h * w).tolist()
    elif depth == "extra":
        inst = x[:, None].tolist()
    elif depth == "scalar":
        inst = 0.5
    poison = draw(st.lists(st.sampled_from(_SPECIAL), max_size=3))
    if poison and isinstance(inst, list) and n and c and h and depth == "ok":
        for k, value in enumerate(poison):
            inst[0][k % c][k % h][k % w] = value
    key = draw(st.sampled_from(["instances", "instances", "inputs", "data"]))
    text = json.dumps({key: inst}, allow_nan=True)
    return text.encode()


@st.composite
def truncated_json(draw) -> bytes:
    """A valid request cut short, or with garbage spliced in."""
    text = json.dumps({"instances": np.full((1, *SHAPE), 0.5).tolist()}).encode()
    cut = draw(st.integers(0, len(text)))
    return text[:cut] + draw(st.binary(max_size=8))


@st.composite
def image(draw) -> bytes:
    """PNG/JPEG/GIF/BMP of a drawn size and mode, sometimes damaged."""
    size = (draw(st.sampled_from([1, 31, 32, 33, 64])), draw(st.sampled_from([1, 31, 32, 33])))
    fmt = draw(st.sampled_from(["PNG", "PNG", "JPEG", "GIF", "BMP"]))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK"]))
    if fmt == "JPEG" and mode not in ("L", "RGB", "CMYK"):
        mode = "RGB"
    if fmt in ("GIF", "BMP") and mode in ("I;16", "CMYK", "LA"):
        mode = "RGB"
    if fmt == "PNG" and mode == "CMYK":
        mode = "RGB"
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    raw = buf.getvalue()
    if draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.binary(max_size=16))
        raw = raw[:at] + junk + raw[at + len(junk):] if draw(st.booleans()) else raw[:at]
    return raw


def _huge(draw) -> bytes:
    """Over the bound: padded JSON, or many valid instances."""
    if draw(st.booleans()):
        return b'{"instances": ' + b" " * (MAX_BYTES + draw(st.integers(1, 5000))) + b"[]}"
    n = MAX_BYTES // (SHAPE[0] * SHAPE[1] * SHAPE[2] * 2) + draw(st.integers(1, 3))
    return json.dumps({"instances": np.zeros((n, *SHAPE), dtype=np.int8).tolist()}).encode()


@st.composite
def hostile(draw) -> dict:
    """One hostile request: body, content type, and maybe a lying Content-Length or extra form fields."""
    kind = draw(st.sampled_from(["bytes", "shaped", "truncated", "image", "huge", "empty", "deep", "text"]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
    elif kind == "shaped":
        body = draw(shaped_json())
    elif kind == "truncated":
        body = draw(truncated_json())
    elif kind == "image":
        body = draw(image())
    elif kind == "huge":
        body = _huge(draw)
    elif kind == "empty":
        body = draw(st.sampled_from([b"", b" ", b"\n\t", b"{}", b"[]", b"null", b'""']))
    elif kind == "deep":
        d = draw(st.integers(10, 3000))
        body = b'{"instances": ' + b"[" * d + b"0.5" + b"]" * draw(st.integers(0, d)) + b"}"
    else:
        body = draw(st.text(max_size=50)).encode("utf-8", "surrogatepass")
    ctype = draw(st.sampled_from(CTYPES))
    length = draw(st.sampled_from(["auto", "auto", "auto", None, "0", "abc", "-5", str(10**12)]))
    extra = draw(st.sampled_from([(), (("extra", "text/plain", b"hi"),), (("file", "image/png", b"\x89PNG"),)]))
    return {"body": body, "ctype": ctype, "length": length, "extra": extra}


# ---------------------------------------------------------------- properties


def _assert_contract(reply: dict, rid: str) -> None:
    status, body = reply["status"], reply["body"]
    assert status in ALLOWED, (rid, status, body)
    assert reply["content_type"] == "application/json", (rid, reply)
    assert isinstance(body, dict), (rid, body)
    if status in (400, 413):
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (rid, body)
    else:
        preds = body["predictions"]
        assert preds and all(set(p) == FIELDS for p in preds), (rid, body)
        assert all(p["verdict"] in ("pass", "rejected", "repaired", "flagged") for p in preds), (rid, body)
        if status == 403:
            assert len(preds) == 1 and preds[0]["verdict"] == "rejected" and preds[0]["label"] is None


FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.lists(hostile(), min_size=1, max_size=4))
def test_hostile_batches_end_in_200_400_403_or_413_with_json_and_the_canary_still_passes(service, canary, reqs):
    requests = [request(f"h{i}", r["body"], r["ctype"], content_length=r["length"], extra_params=r["extra"])
                for i, r in enumerate(reqs)]
    requests.insert(len(requests) // 2, request("canary", canary["body"], "application/json"))
    replies = serve(service, requests)
    assert [r["id"] for r in replies] == [q["id"] for q in requests]
    for reply in replies:
        _assert_contract(reply, reply["id"])
    (c,) = [r for r in replies if r["id"] == "canary"]
    assert c["status"] == 200
    assert c["body"]["predictions"][0]["verdict"] == "pass" and c["body"]["predictions"][0]["label"] == canary["label"]


def test_each_hostile_kind_is_answered_with_its_own_status(service, canary):
    """Hand-picked representatives of each hostile class, and their exact status."""
    x = np.full((1, *SHAPE), 0.5)
    over = {"instances": x.tolist()}
    cases = {
        "empty": (b"", "application/json", 400),
        "bytes": (bytes(range(256)), "application/octet-stream", 400),
        "truncated": (canary["body"][:100], "application/json", 400),
        "nan": (json.dumps({"instances": x.tolist()}).replace("0.5", "NaN", 1).encode(), "application/json", 400),
        "inf": (json.dumps({"instances": x.tolist()}).replace("0.5", "Infinity", 1).encode(), "application/json", 400),
        "range": (json.dumps({"instances": (x * 3).tolist()}).encode(), "application/json", 400),
        "channels": (json.dumps({"instances": np.full((1, 1, 32, 32), 0.5).tolist()}).encode(), "text/json", 400),
        "nesting": (json.dumps({"instances": x[0].tolist()}).encode(), "application/json", 400),
        "mismatch": (canary["body"], "image/png", 400),
        "png-as-json": (png(canary["clean"][0]), "application/json", 400),
        "wrong-size": (png(np.zeros((3, 16, 16), np.float32)), "image/png", 400),
        "wrong-mode": (_img("CMYK", "JPEG"), "image/jpeg", (200, 403)),  # 32x32 CMYK: converted, then guarded
        "gif": (_img("P", "GIF"), "image/png", 400),
        "huge": (json.dumps({"instances": np.zeros((8, *SHAPE), np.int8).tolist()}).encode(), "application/json",
                 413),
        "text": ("{\"instances\": \u00e9".encode(), "text/plain", 400),
        "xml": (b"<a/>", "application/xml", 400),
        "clean": (canary["body"], "application/json", 200),
        "triggered": (json.dumps({"instances": canary["triggered"][:1].tolist()}).encode(), "application/json", 403),
        "padded": (json.dumps(over).encode() + b" " * MAX_BYTES, "application/json", 413),
    }
    replies = serve(service, [request(k, body, ctype) for k, (body, ctype, _) in cases.items()])
    got = {r["id"]: r["status"] for r in replies}
    for k, (_, _, expected) in cases.items():
        assert got[k] in (expected if isinstance(expected, tuple) else (expected,)), (k, got[k], replies)
    for r in replies:
        _assert_contract(r, r["id"])


def _img(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (32, 32)).save(buf, format=fmt)
    return buf.getvalue()


def test_the_worker_survives_a_batch_of_only_hostile_requests_then_serves(service, canary):
    junk = [request(f"j{i}", b, c) for i, (b, c) in enumerate([
        (b"[" * 30_000, "application/json"), (b"\xff" * 50, "text/plain"), (b"", None),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png"), (b"\xff\xd8\xff" + b"\x00" * 100, None)])]
    assert all(r["status"] == 400 for r in serve(service, junk))
    (ok,) = serve(service, [request("after", canary["body"], "application/json")])
    assert ok["status"] == 200 and ok["body"]["predictions"][0]["label"] == canary["label"]


def test_the_request_bound_is_configurable_at_archive_time(unpacked, tmp_path, monkeypatch, canary):
    """Default 1 MiB; ``max_request_bytes`` in the archive's handler section moves it (here to the body size)."""
    body = canary["body"]
    svc = load_service(variant(unpacked, tmp_path, max_request_bytes=len(body) - 1), monkeypatch)
    (r,) = serve(svc, [request("x", body, "application/json")])
    assert r["status"] == 413 and str(len(body) - 1) in r["body"]["error"]
    svc = load_service(variant(unpacked, tmp_path / "b", max_request_bytes=len(body)), monkeypatch)
    (r,) = serve(svc, [request("x", body, "application/json")])
    assert r["status"] == 200


@pytest.fixture(scope="module")
def unpacked(demo_world, demo_profile, tmp_path_factory) -> Path:
    """The demo archive with guard archive's defaults, unpacked."""
    export = tmp_path_factory.mktemp("fuzz-default-mar")
    mar, cfg = make_archive(name=NAME, model_file=demo_world.model_file, weights=demo_world.weights,
                            profile=demo_profile, export_path=export)
    assert cfg["handler"]["max_request_bytes"] == 1_048_576
    base = tmp_path_factory.mktemp("fuzz-default") / NAME
    with zipfile.ZipFile(mar) as z:
        z.extractall(base)
    return base
