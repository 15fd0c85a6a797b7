"""guard.serving.decode.decode_request: what a client may send, what it gets back, and that nothing else escapes.

The property tests feed arbitrary bytes, arbitrary JSON (raw and pre-parsed, as TorchServe hands it
over for application/json), near-valid instances and damaged images: the decoder either returns a
valid float32 (N, C, H, W) batch in [0, 1] or raises InputError (HTTP 400/413), never anything else.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from guard.errors import InputError, PayloadTooLarge
from guard.serving.decode import decode_request

SHAPE = (3, 8, 8)
BIG = 10_000_000


def decode(body, ctype="application/json", *, shape=SHAPE, max_bytes=BIG):
    return decode_request(body, ctype, input_shape=shape, max_bytes=max_bytes)


def batch(n=2, shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape)).astype(np.float32)


def png(arr_hwc: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_hwc, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def image_of(x_chw: np.ndarray) -> np.ndarray:
    """uint8 HWC (or HW) of a CHW image in [0, 1]."""
    u8 = np.rint(x_chw * 255).astype(np.uint8)
    return u8[0] if u8.shape[0] == 1 else u8.transpose(1, 2, 0)


def assert_valid(x: np.ndarray, shape=SHAPE) -> None:
    assert isinstance(x, np.ndarray) and x.dtype == np.float32
    assert x.ndim == 4 and x.shape[0] >= 1 and x.shape[1:] == shape
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


# ---------------------------------------------------------------- JSON


def test_json_bytes_str_and_parsed_dict_decode_the_same():
    x = batch()
    payload = {"instances": x.tolist()}
    text = json.dumps(payload)
    for body in (text.encode(), bytearray(text.encode()), text, payload):
        out = decode(body)
        assert_valid(out)
        np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "APPLICATION/JSON", None,
                                   "application/octet-stream", "text/plain"])
def test_json_is_recognised_by_type_or_by_its_first_byte(ctype):
    out = decode(json.dumps({"instances": batch(1).tolist()}).encode(), ctype)
    assert out.shape == (1, *SHAPE)


def test_integer_zero_and_one_are_numbers_in_range():
    x = np.ones((1, *SHAPE), dtype=np.int64)
    x[0, 0, 0, 0] = 0
    out = decode({"instances": x.tolist()})
    assert out.dtype == np.float32 and out[0, 0, 0, 0] == 0 and out[0, 1, 0, 0] == 1


@pytest.mark.parametrize("body, words", [
    (b'{"instances": [NaN]}', "shape"),
    (json.dumps({"instances": np.full((1, *SHAPE), 0.5).tolist()}).replace("0.5", "NaN", 1), "nan"),
    (json.dumps({"instances": np.full((1, *SHAPE), 0.5).tolist()}).replace("0.5", "Infinity", 1), "inf"),
    (json.dumps({"instances": np.full((1, *SHAPE), 0.5).tolist()}).replace("0.5", "1e999", 1), "inf"),
    (json.dumps({"instances": np.full((1, *SHAPE), 1.5).tolist()}), "[0, 1]"),
    (json.dumps({"instances": np.full((1, *SHAPE), -0.1).tolist()}), "[0, 1]"),
    (json.dumps({"instances": np.full((1, 3, 8, 7), 0.5).tolist()}), "3x8x8"),
    (json.dumps({"instances": np.full((1, 8, 8), 0.5).tolist()}), "3x8x8"),
    (json.dumps({"instances": np.full((1, 1, 3, 8, 8), 0.5).tolist()}), "3x8x8"),
    (json.dumps({"instances": np.full((3, 8, 8), 0.5).tolist()}), "3x8x8"),
    (json.dumps({"instances": []}), "empty"),
    (json.dumps({"instances": 0.5}), "list"),
    (json.dumps({"images": []}), "instances"),
    (json.dumps([np.full(SHAPE, 0.5).tolist()]), "object"),
    (json.dumps({"instances": np.full((1, *SHAPE), True).tolist()}), "boolean"),
    (json.dumps({"instances": np.full((1, *SHAPE), "0.5").tolist()}), "numbers"),
    (b'{"instances": [[[[0.5, 0.5], [0.5]]]]}', "shape"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"   ", "empty"),
    (b"", "empty"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
    (b'{"instances": ' + b"[" * 500 + b"]" * 500 + b"}", "deep"),
    (b'{"instances": [' + b"9" * 5000 + b"]}", ""),
    (b"hello", "Content-Type"),
])
def test_bad_json_is_an_input_error_with_a_useful_message(body, words):
    ctype = None if body in (b"hello",) else "application/json"
    with pytest.raises(InputError) as err:
        decode(body, ctype)
    assert not isinstance(err.value, PayloadTooLarge)
    assert words.lower() in str(err.value).lower()


def test_ragged_instances_are_rejected():
    good = np.full(SHAPE, 0.5).tolist()
    ragged = [row[:] for row in good]
    ragged[2] = ragged[2][:-1]
    with pytest.raises(InputError):
        decode({"instances": [good, ragged]})
    with pytest.raises(InputError):
        decode({"instances": [good, {"b64": "x"}]})


def test_none_body_is_an_input_error():
    with pytest.raises(InputError, match="empty"):
        decode(None)


def test_error_names_the_expected_shape():
    with pytest.raises(InputError, match=r"instance 1 has shape 3x8x9; the model takes 3x8x8"):
        decode({"instances": [np.zeros(SHAPE).tolist(), np.zeros((3, 8, 9)).tolist()]})


# ---------------------------------------------------------------- size bound


def test_body_above_max_bytes_is_payload_too_large_413():
    body = json.dumps({"instances": batch(4).tolist()}).encode()
    with pytest.raises(PayloadTooLarge) as err:
        decode(body, max_bytes=len(body) - 1)
    assert err.value.http_status == 413 and isinstance(err.value, InputError)
    assert decode(body, max_bytes=len(body)).shape[0] == 4
    with pytest.raises(PayloadTooLarge):
        decode(png(image_of(batch(1)[0])), "image/png", max_bytes=10)


def test_pre_parsed_json_is_bounded_by_the_smallest_text_that_could_carry_it():
    payload = {"instances": np.zeros((10, *SHAPE), dtype=np.int64).tolist()}  # "0," per value
    smallest = 10 * int(np.prod(SHAPE)) * 2
    assert decode(payload, max_bytes=smallest).shape[0] == 10
    with pytest.raises(PayloadTooLarge):
        decode(payload, max_bytes=smallest - 1)


# ---------------------------------------------------------------- images


def test_png_round_trips_exactly():
    x = np.rint(batch(1)[0] * 255) / 255
    out = decode(png(image_of(x)), "image/png")
    assert_valid(out)
    np.testing.assert_allclose(out[0], x, atol=1e-6)


def test_png_is_sniffed_without_a_content_type():
    out = decode(png(image_of(batch(1)[0])), None)
    assert out.shape == (1, *SHAPE)
    out = decode(png(image_of(batch(1)[0])), "application/octet-stream")
    assert out.shape == (1, *SHAPE)


def test_jpeg_decodes_close_to_the_original():
    x = np.full(SHAPE, 0.5, dtype=np.float32)
    out = decode(png(image_of(x), fmt="JPEG"), "image/jpeg")
    assert_valid(out)
    assert np.abs(out - x).max() < 0.05


def test_channels_are_converted_to_the_models_count():
    grey = np.full((8, 8), 128, dtype=np.uint8)
    out = decode(png(grey), "image/png")  # 1-channel image, 3-channel model
    assert out.shape == (1, 3, 8, 8) and np.allclose(out, 128 / 255)
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    out = decode(png(rgb), "image/png", shape=(1, 8, 8))  # RGB image, 1-channel model
    assert out.shape == (1, 1, 8, 8) and 0.5 < out.mean() < 0.65  # ITU-R 601 luma of pure green
    rgba = np.full((8, 8, 4), 200, dtype=np.uint8)
    assert decode(png(rgba), "image/png").shape == (1, 3, 8, 8)


def test_image_of_another_size_is_rejected_naming_the_expected_size():
    with pytest.raises(InputError, match=r"image is 16x8 \(width x height\); the model takes 8x8"):
        decode(png(np.zeros((8, 16, 3), dtype=np.uint8)), "image/png")


def test_huge_image_is_rejected_from_its_header_before_decoding():
    with pytest.raises(InputError, match="4000x4000"):
        decode(png(np.zeros((4000, 4000), dtype=np.uint8)), "image/png")


@pytest.mark.parametrize("mutate", [lambda b: b[:len(b) // 2], lambda b: b[:20], lambda b: b[:8] + b"\x00" * 40,
                                    lambda b: b[:40] + bytes(v ^ 0xFF for v in b[40:60]) + b[60:]])
def test_damaged_png_is_an_input_error(mutate):
    with pytest.raises(InputError):
        decode(mutate(png(image_of(batch(1)[0]))), "image/png")


def test_content_type_and_body_must_agree():
    with pytest.raises(InputError, match="JSON"):
        decode({"instances": batch(1).tolist()}, "image/png")
    with pytest.raises(InputError, match="PNG or JPEG"):
        decode(b'{"instances": []}', "image/png")
    with pytest.raises(InputError, match="unsupported Content-Type"):
        decode(b'{"instances": []}', "application/xml")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(InputError, match="GIF"):
        decode(gif.getvalue(), "image/png")


def test_models_with_other_channel_counts_cannot_take_images():
    with pytest.raises(InputError, match="2-channel"):
        decode(png(np.zeros((8, 8), dtype=np.uint8)), "image/png", shape=(2, 8, 8))
    x = batch(1, shape=(2, 8, 8))
    assert decode({"instances": x.tolist()}, shape=(2, 8, 8)).shape == (1, 2, 8, 8)


# ---------------------------------------------------------------- properties

CTYPES = st.sampled_from([None, "", "application/json", "image/png", "image/jpeg", "text/plain",
                          "application/octet-stream", "multipart/form-data", "x/y", "application/json; q"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**30, max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30,
)
SMALL = (1, 2, 2)
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.booleans(),
                   st.just("0.5"), st.none())


def _near_valid(draw_values, shape):
    """Nested lists of roughly the right shape with arbitrary leaves."""
    c, h, w = shape
    return st.lists(st.lists(st.lists(st.lists(draw_values, min_size=w - 1, max_size=w + 1),
                                      min_size=h - 1, max_size=h + 1),
                             min_size=c, max_size=c + 1), min_size=0, max_size=3)


def _outcome(body, ctype, shape=SMALL, max_bytes=4096):
    try:
        out = decode_request(body, ctype, input_shape=shape, max_bytes=max_bytes)
    except InputError:
        return None
    assert_valid(out, shape)
    return out


FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=600), CTYPES)
def test_arbitrary_bytes_only_ever_raise_input_error(body, ctype):
    _outcome(body, ctype)


@FAST
@given(JSON, CTYPES)
def test_arbitrary_json_raw_or_parsed_only_ever_raises_input_error(obj, ctype):
    _outcome(json.dumps(obj).encode(), ctype)
    _outcome(obj, ctype)
    _outcome({"instances": obj}, ctype)
    _outcome(json.dumps({"instances": obj}), ctype)


@FAST
@given(_near_valid(VALUES, SMALL), CTYPES)
def test_near_valid_instances_only_ever_raise_input_error(instances, ctype):
    _outcome({"instances": instances}, ctype)
    out = _outcome(json.dumps({"instances": instances}).encode(), ctype)
    if out is not None:
        assert out.shape[0] == len(instances)


@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1"]),
       st.sampled_from(["PNG", "JPEG"]), st.integers(0, 400), st.binary(max_size=8), st.sampled_from([1, 3]))
def test_damaged_or_odd_images_only_ever_raise_input_error(w, h, mode, fmt, cut, junk, channels):
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        mode = "RGB"
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=fmt)
    raw = buf.getvalue()
    shape = (channels, 4, 4)
    out = _outcome(raw, None, shape=shape)
    assert (out is not None) == ((w, h) == (4, 4))
    damaged = raw[:cut] + junk + raw[cut + len(junk):]
    _outcome(damaged, "image/png", shape=shape)
    _outcome(damaged, None, shape=shape)
