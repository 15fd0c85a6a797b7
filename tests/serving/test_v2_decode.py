"""Open Inference Protocol (v2) requests, multipart uploads and the v2 answer form, without a model.

``decode_payload`` on v2 bodies (flat and nested data, parsed by TorchServe or raw bytes), every way a
v2 body can be wrong (a 400 naming what was expected, a 413 over the bound), a multipart upload whose
content type an ingress replaced with ``application/octet-stream``, and ``v2_body``'s outputs.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from guard.errors import InputError, PayloadTooLarge
from guard.serving.decode import INSTANCES, V2, decode_payload, decode_request
from guard.serving.service import v2_body

SHAPE = (3, 4, 4)
LIMIT = 1 << 20


def v2(x: np.ndarray, *, flat: bool = True, **override) -> dict:
    tensor = {"name": "input-0", "shape": list(x.shape), "datatype": "FP32",
              "data": x.reshape(-1).tolist() if flat else x.tolist()}
    tensor.update(override)
    return {"id": "req-1", "inputs": [tensor]}


def dec(body, ctype="application/json", limit=LIMIT):
    return decode_payload(body, ctype, input_shape=SHAPE, max_bytes=limit)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("raw", [False, True])
def test_a_v2_body_decodes_to_the_batch_and_remembers_its_protocol(flat, raw):
    x = np.random.default_rng(0).random((2, *SHAPE)).astype(np.float32)
    body = v2(x, flat=flat)
    out = dec(json.dumps(body).encode() if raw else body)
    assert out.protocol == V2 and out.request_id == "req-1" and out.input_name == "input-0"
    np.testing.assert_allclose(out.x, x, rtol=1e-6)
    np.testing.assert_allclose(decode_request(body, "application/json", input_shape=SHAPE, max_bytes=LIMIT), x,
                               rtol=1e-6)


def test_instances_keep_their_protocol():
    out = dec({"instances": np.zeros((1, *SHAPE)).tolist()})
    assert out.protocol == INSTANCES and out.request_id is None and out.x.shape == (1, *SHAPE)


BAD = [
    ({"inputs": []}, "one tensor"),
    ({"inputs": {"name": "x"}}, "one tensor"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32"}]}, "'data'"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "INT8", "data": [0] * 48}]}, "FP32"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 5, 4], "datatype": "FP32", "data": [0] * 60}]}, "[N, 3, 4, 4]"),
    ({"inputs": [{"name": "x", "shape": [3, 4, 4], "datatype": "FP32", "data": [0] * 48}]}, "[N, 3, 4, 4]"),
    ({"inputs": [{"name": "x", "shape": [0, 3, 4, 4], "datatype": "FP32", "data": [0]}]}, "N >= 1"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 47}]}, "needs 48"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [2.0] * 48}]}, "[0, 1]"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": ["a"] * 48}]}, "numbers"),
    ({"inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [True] * 48}]}, "numbers"),
    ({"inputs": [{"name": 5, "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 48}]}, "name"),
    ({"inputs": [{"name": "x", "shape": "1,3,4,4", "datatype": "FP32", "data": [0] * 48}]}, "shape"),
    ({"id": 7, "inputs": [{"name": "x", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0] * 48}]}, "id"),
    ({"nothing": 1}, "instances"),
]


@pytest.mark.parametrize("body,words", BAD)
def test_malformed_v2_bodies_are_400_naming_what_is_wrong(body, words):
    for sent in (body, json.dumps(body).encode()):
        with pytest.raises(InputError) as e:
            dec(sent)
        assert e.value.http_status == 400 and words in str(e.value), str(e.value)


def test_a_v2_batch_that_cannot_fit_the_bound_is_413():
    body = {"inputs": [{"name": "x", "shape": [10**6, 3, 4, 4], "datatype": "FP32", "data": [0.5]}]}
    with pytest.raises(PayloadTooLarge):
        dec(body, limit=10_000)


def _png(x_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.rint(x_chw * 255).astype(np.uint8).transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _form(part: bytes, ptype: str, name: str = "data") -> bytes:
    return (b"--b0\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nignored\r\n"
            b"--b0\r\nContent-Disposition: form-data; name=\"" + name.encode() + b"\"; filename=\"x\"\r\n"
            b"Content-Type: " + ptype.encode() + b"\r\n\r\n" + part + b"\r\n--b0--\r\n")


@pytest.mark.parametrize("ctype", ["application/octet-stream", "multipart/form-data; boundary=b0", None])
def test_a_multipart_upload_is_unpacked_even_as_octet_stream(ctype):
    x = np.round(np.random.default_rng(1).random(SHAPE) * 255) / 255
    out = dec(_form(_png(x), "image/png"), ctype)
    np.testing.assert_allclose(out.x[0], x, atol=1e-6)
    out = dec(_form(json.dumps(v2(x[None])).encode(), "application/json"), ctype)
    assert out.protocol == V2


@pytest.mark.parametrize("body", [b"--b0\r\n\r\n", b"--b0\r\nContent-Disposition: form-data\r\nno blank line",
                                  b"--b0\r\n--b0--\r\n", _form(b"", "image/png"), _form(b"not an image", "image/png")])
def test_broken_multipart_uploads_are_400(body):
    with pytest.raises(InputError):
        dec(body, "application/octet-stream")


def test_v2_body_withholds_a_rejected_label_and_probabilities():
    answers = [{"label": 2, "probabilities": [0.1, 0.2, 0.7], "verdict": "pass", "reasons": [], "scores": {}},
               {"label": None, "probabilities": None, "verdict": "rejected", "reasons": ["strip", "nc"],
                "scores": {"strip": 1.0}}]
    body = v2_body("demo", answers, request_id="r")
    assert body["model_name"] == "demo" and body["id"] == "r"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["label"] == {"name": "label", "datatype": "INT64", "shape": [2], "data": [2, -1]}
    assert out["probabilities"]["shape"] == [2, 3] and out["probabilities"]["data"] == [0.1, 0.2, 0.7, 0, 0, 0]
    assert out["verdict"]["data"] == ["pass", "rejected"] and out["reasons"]["data"] == ["", "strip,nc"]
    bare = v2_body("base", [{"label": 1, "probabilities": [0.5, 0.5]}])
    assert [o["name"] for o in bare["outputs"]] == ["label", "probabilities"] and "id" not in bare
