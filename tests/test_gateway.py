"""guard.torchserve.gateway in process, against a recording stand-in for TorchServe (no Java needed).

The stand-in answers like TorchServe's frontend where it matters: 400 ``InvalidKeyException`` without
the right token, ``x-request-id`` on every answer, and what it received (method, path, content type,
body) so each test can see exactly what the gateway forwarded. The same promises are checked against
the real TorchServe in tests/integration/test_load.py and test_access.py.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard.torchserve.gateway import Route, Spec, inference_body, serve

KEY = "good-key"
BOUND = 4096


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        record = {"method": self.command, "path": self.path, "content_type": self.headers.get("Content-Type"),
                  "body": body.decode("latin-1"), "host": self.headers.get("Host"),
                  "expect": self.headers.get("Expect"), "te": self.headers.get("Transfer-Encoding")}
        _Upstream.seen.append(record)
        if self.path.startswith("/slow"):
            time.sleep(2.0)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            status, out = 400, {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}
        elif self.path.startswith("/fail"):
            status, out = 500, {"code": 500, "type": "InternalServerException", "message": "worker died"}
        else:
            status, out = 200, {"predictions": [record]}
        raw = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-request-id", "rid-123")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


@contextmanager
def _running(spec_for) -> Iterator[dict[str, int]]:
    """A stand-in upstream and a gateway in front of it; yields their ports; both always shut down."""
    up = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    up.daemon_threads = True
    threading.Thread(target=up.serve_forever, daemon=True).start()
    spec = spec_for(f"http://127.0.0.1:{up.server_address[1]}")
    holder: dict = {}
    ready = threading.Event()

    def _ready(servers):
        holder["servers"] = servers
        ready.set()

    t = threading.Thread(target=serve, args=(spec,), kwargs={"ready": _ready}, daemon=True)
    t.start()
    try:
        assert ready.wait(10), "gateway did not start"
        ports = {r.name: s.server_address[1] for r, s in zip(spec.routes, holder["servers"])}
        ports["upstream"] = up.server_address[1]
        yield ports
    finally:
        for s in holder.get("servers", []):
            s.shutdown()
        t.join(10)
        up.shutdown()
        up.server_close()


def _spec(upstream: str) -> Spec:
    return Spec(routes=[Route("inference", "127.0.0.1", 0, upstream), Route("management", "127.0.0.1", 0, upstream),
                        Route("metrics", "127.0.0.1", 0, upstream)],
                max_body=BOUND, upstream_timeout=1.0, key_hint="/run/key_file.json")


@pytest.fixture(scope="module")
def gw():
    with _running(_spec) as ports:
        yield ports


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         key: str | None = KEY) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        h = dict(headers or {})
        if key:
            h["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=h)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw)
    finally:
        conn.close()


def seen_by_upstream(answer: dict) -> dict:
    return answer["predictions"][0]


def test_json_png_and_jpeg_are_forwarded_with_their_bare_media_type(gw):
    for ctype, bare in (("application/json; charset=foo", "application/json"), ("image/png", "image/png"),
                        ("IMAGE/JPEG", "image/jpeg")):
        status, headers, out = call(gw["inference"], "POST", "/predictions/m", b'{"instances": []}',
                                    {"Content-Type": ctype})
        assert status == 200 and headers["x-request-id"] == "rid-123"
        got = seen_by_upstream(out)
        assert got["content_type"] == bare and got["body"] == '{"instances": []}'
        assert got["host"] == f"127.0.0.1:{gw['upstream']}" and got["path"] == "/predictions/m"


def test_other_types_reach_the_handler_as_octet_stream_so_the_form_decoder_never_sees_them(gw):
    for ctype in ("application/x-www-form-urlencoded", "text/plain; charset=nope", "application/xml",
                  "multipart/mixed; boundary=x", "bad\x01type", None):
        headers = {"Content-Type": ctype} if ctype is not None else {}
        status, _, out = call(gw["inference"], "POST", "/predictions/m", b"a=%zz", headers)
        assert status == 200, ctype
        assert seen_by_upstream(out)["content_type"] == "application/octet-stream"
        assert seen_by_upstream(out)["body"] == "a=%zz"


def test_a_multipart_form_is_unpacked_to_its_data_part():
    form = (b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nx\r\n"
            b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\nrest\r\n--b--\r\n")
    assert inference_body(form, "multipart/form-data; boundary=b") == (b"\x89PNG\r\n\x1a\nrest", "image/png")
    only = b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n{\"instances\": []}\r\n--b--\r\n"
    assert inference_body(only, "multipart/form-data; boundary=b") == (b'{"instances": []}',
                                                                         "application/octet-stream")


@pytest.mark.parametrize("ctype,body", [
    ("multipart/form-data", b"--x\r\n\r\nabc\r\n--x--\r\n"),  # no boundary: TorchServe answers 500
    ("multipart/form-data; boundary=", b"--\r\n\r\n"),  # empty boundary: TorchServe answers 500
    ("multipart/form-data; boundary=x", b"garbage"),
])
def test_a_multipart_form_that_cannot_be_unpacked_is_a_400_here(gw, ctype, body):
    n = len(_Upstream.seen)
    status, _, out = call(gw["inference"], "POST", "/predictions/m", body, {"Content-Type": ctype})
    assert status == 400 and "multipart" in out["error"]
    assert len(_Upstream.seen) == n  # never forwarded


def test_management_bodies_and_types_pass_unchanged(gw):
    status, _, out = call(gw["management"], "PUT", "/models/m?min_worker=2", b"a=%zz",
                          {"Content-Type": "application/x-www-form-urlencoded"})
    got = seen_by_upstream(out)
    assert status == 200 and got["content_type"] == "application/x-www-form-urlencoded" and got["method"] == "PUT"


def test_invalid_key_becomes_401_with_www_authenticate_and_the_key_file(gw):
    for port, api in ((gw["inference"], "inference"), (gw["management"], "management")):
        for key in (None, "wrong"):
            status, headers, out = call(port, "GET", "/ping", key=key)
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert out["type"] == "InvalidKeyException" and f"<{api} key>" in out["error"]
            assert "/run/key_file.json" in out["error"]


def test_over_bound_bodies_get_a_json_413_and_are_never_forwarded(gw):
    n = len(_Upstream.seen)
    status, headers, out = call(gw["inference"], "POST", "/predictions/m", b"x" * (BOUND + 1))
    assert status == 413 and str(BOUND) in out["error"] and headers["connection"] == "close"
    assert call(gw["inference"], "POST", "/predictions/m", b"x" * BOUND)[0] == 200
    # a client that sends all of a large body before reading gets the 413, not a connection reset
    status, _, out = call(gw["inference"], "POST", "/predictions/m", b"x" * 8_000_000)
    assert status == 413 and "8000000 bytes" in out["error"]
    assert len(_Upstream.seen) == n + 1


def _raw(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, rest = out.partition(b"\r\n\r\n")
                    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                                   if h.lower().startswith(b"content-length:")), None)
                    if length is not None and len(rest) >= length:
                        break
        except TimeoutError:
            pass
        return out


def test_chunked_bodies_are_bounded_and_forwarded_with_a_length(gw):
    head = (b"POST /predictions/m HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    ok = _raw(gw["inference"], head + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and b'"body": "hello world"' in ok and b'"te": null' in ok
    big = _raw(gw["inference"], head + b"%x\r\n" % (BOUND + 1) + b"x" * (BOUND + 1) + b"\r\n0\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413") and b'"error"' in big
    bad = _raw(gw["inference"], head + b"zz\r\n")
    assert bad.startswith(b"HTTP/1.1 400") and b"chunked" in bad


def test_expect_100_is_refused_before_an_over_bound_body_is_sent(gw):
    head = (b"POST /predictions/m HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % (BOUND * 10))
    answer = _raw(gw["inference"], head)
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer


@pytest.mark.parametrize("request_bytes,status", [
    (b"BREW /predictions/m HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400),
    (b"POST /predictions/m HTTP/1.1\r\nContent-Length: -3\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_the_gateways_own_parse_errors_are_json_4xx(gw, request_bytes, status):
    answer = _raw(gw["inference"], request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and int(head.split()[1]) == status, head
    assert json.loads(body)["code"] == status


def test_upstream_errors_are_relayed_and_a_silent_upstream_is_a_json_5xx(gw):
    status, headers, out = call(gw["inference"], "POST", "/fail", b"{}")
    assert status == 500 and out["type"] == "InternalServerException"  # TorchServe's own 5xx, unchanged
    status, _, out = call(gw["inference"], "GET", "/slow")
    assert status == 504 and "did not answer" in out["error"]


def test_a_dead_upstream_is_a_json_502():
    def spec_for(_):
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        return _spec(f"http://127.0.0.1:{dead}")

    with _running(spec_for) as ports:
        status, _, out = call(ports["inference"], "GET", "/ping")
        assert status == 502 and "not answering" in out["error"]


def test_keep_alive_connections_serve_many_requests(gw):
    conn = http.client.HTTPConnection("127.0.0.1", gw["inference"], timeout=10)
    try:
        for i in range(20):
            conn.request("POST", f"/predictions/m?i={i}", body=b"{}",
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["predictions"][0]["path"].endswith(f"i={i}")
    finally:
        conn.close()


CTYPES = st.one_of(st.none(), st.sampled_from(["application/json", "image/png", "multipart/form-data",
                                                "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                                                "text/plain; charset=x"]), st.text(max_size=40))


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=BOUND + 64), ctype=CTYPES, key=st.sampled_from([KEY, None]))
def test_any_body_and_content_type_end_in_a_json_answer_the_contract_allows(gw, body, ctype, key):
    headers = {}
    if ctype is not None and ctype.isprintable() and "\n" not in ctype:
        headers["Content-Type"] = ctype
    status, _, out = call(gw["inference"], "POST", "/predictions/m", body, headers, key=key)
    assert status in (200, 400, 401, 413), (status, out)
    if status == 200:
        assert seen_by_upstream(out)["content_type"] in ("application/json", "image/png", "image/jpeg",
                                                         "application/octet-stream")
    else:
        assert "error" in out


def _gateway_counts(port: int) -> dict[tuple[str, str], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        text = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200 and text.startswith('{"predictions"')  # TorchServe's page comes first, unchanged
    pat = re.compile(r'^guard_gateway_responses_total\{api="([^"]+)",code="(\d+)"\} (\S+)$', re.M)
    return {(api, code): float(v) for api, code, v in pat.findall(text)}


def test_the_gateways_own_answers_are_counted_on_the_metrics_page():
    with _running(_spec) as ports:
        assert _gateway_counts(ports["metrics"]) == {}
        call(ports["inference"], "GET", "/ping", key=None)  # 401
        call(ports["inference"], "GET", "/ping", key="wrong")  # 401
        call(ports["management"], "GET", "/models", key=None)  # 401
        call(ports["inference"], "POST", "/predictions/m", b"x" * (BOUND + 1))  # 413
        call(ports["inference"], "POST", "/predictions/m", b"{}")  # forwarded: not the gateway's answer
        assert _gateway_counts(ports["metrics"]) == {("inference", "401"): 2, ("management", "401"): 1,
                                                     ("inference", "413"): 1}
