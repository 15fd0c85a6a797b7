"""A client of TorchServe's gRPC inference API (``InferenceAPIsService``) for the integration tests.

Imported as ``grpc_helpers`` (tests/ is on ``sys.path``, as for ``serve_helpers``). The few messages
the tests need are encoded by hand in protobuf's wire format, from the field numbers of TorchServe's
``inference.proto`` (package ``org.pytorch.serve.grpc.inference``), so no stubs are compiled:

* ``PredictionsRequest``: ``model_name`` = 1 (string), ``model_version`` = 2 (string), ``input`` = 3
  (``map<string, bytes>``: repeated entries, key = 1, value = 2);
* ``PredictionResponse``: ``prediction`` = 1 (bytes);
* ``TorchServeHealthResponse``: ``health`` = 1 (string); ``Ping`` takes ``google.protobuf.Empty``.
"""

from __future__ import annotations

SERVICE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predictions_request(model: str, inputs: dict[str, bytes]) -> bytes:
    msg = _field(1, model.encode())
    for key, value in inputs.items():
        msg += _field(3, _field(1, key.encode()) + _field(2, value))
    return msg


def first_bytes_field(msg: bytes) -> bytes:
    """Field 1 (length-delimited) of a message: ``prediction`` or ``health``; b"" when absent."""
    i = 0
    while i < len(msg):
        key, shift = 0, 0
        while True:
            b = msg[i]
            i += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, shift = 0, 0
            while True:
                b = msg[i]
                i += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if number == 1:
                return msg[i:i + length]
            i += length
        elif wire == 0:
            while msg[i] & 0x80:
                i += 1
            i += 1
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return b""


class InferenceClient:
    """``Predictions`` and ``Ping`` over an insecure channel to 127.0.0.1 (``key``: sent as bearer metadata)."""

    def __init__(self, port: int, key: str | None = None):
        import grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self._predict = self.channel.unary_unary(f"{SERVICE}/Predictions", request_serializer=None,
                                                 response_deserializer=None)
        self._ping = self.channel.unary_unary(f"{SERVICE}/Ping", request_serializer=None, response_deserializer=None)

    def predict(self, model: str, inputs: dict[str, bytes], timeout: float = 60) -> bytes:
        return first_bytes_field(self._predict(predictions_request(model, inputs), timeout=timeout,
                                               metadata=self.metadata))

    def ping(self, timeout: float = 30) -> str:
        return first_bytes_field(self._ping(b"", timeout=timeout, metadata=self.metadata)).decode()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
