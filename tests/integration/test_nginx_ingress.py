"""The nginx ingress config (deploy/nginx/) on a real nginx in front of a recording stand-in for TorchServe.

No Java: nginx is started from the config ``guard serve --ingress nginx`` renders (free loopback ports,
``daemon off``, stopped by pid in the fixture's teardown), forwarding to a small HTTP server that records
what reached it. Checked: a missing or wrong token is a JSON 401 with ``WWW-Authenticate: Bearer`` and
never reaches TorchServe; the token is stripped before forwarding; a body over the bound is a JSON 413
naming it, whatever its size or framing; JSON, PNG and JPEG keep their media type and every other body
(forms, multipart, text) goes on as ``application/octet-stream``; every answer has an ``X-Request-Id``
(TorchServe's when it answered) and a JSON access-log line; a TorchServe that does not answer is a JSON
502 (not listening) or 504 (too slow).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from serve_helpers import require_nginx

from guard.torchserve import ingress
from guard.torchserve.ports import free_ports

pytestmark = pytest.mark.integration
KEYS = {"inference": "inference-key-0123456789", "management": "management-key-0123456789"}
MAX_BODY = 4096


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict] = []
    delay_s = 0.0

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        Recorder.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": body})
        if self.path.startswith("/slow"):
            time.sleep(3)
        out = json.dumps({"ok": True}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("x-request-id", "ts-request-id")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except (BrokenPipeError, ConnectionResetError):  # nginx gave up on the slow answer (the 504 test)
            pass

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    """nginx rendered as guard serve renders it; upstreams: the recorder (inference, management) and a closed
    port (metrics, for the 502). Yields the public ports and nginx's prefix."""
    nginx = require_nginx()
    prefix = tmp_path_factory.mktemp("ingress") / "nginx"
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    ports = tuple(free_ports(3))
    closed = free_ports(1)[0]
    up = upstream.server_address[1]
    values = ingress.template_values(host="127.0.0.1", ports=ports, upstream=(up, up, closed), max_body=MAX_BODY,
                                     keys=KEYS, key_hint="keys in /run/key_file.json", log_dir=prefix, workers="1")
    values["GUARD_UPSTREAM_TIMEOUT"] = "1"
    ingress.write_config(prefix, values)
    ingress.validate_nginx_config(nginx, prefix)
    proc = subprocess.Popen(ingress.command(nginx, prefix), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", ports[0]), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {"inference": ports[0], "management": ports[1], "metrics": ports[2], "prefix": prefix}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        upstream.shutdown()
        upstream.server_close()


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bearer(kind: str = "inference") -> dict:
    return {"Authorization": f"Bearer {KEYS[kind]}"}


@pytest.mark.parametrize("auth", [None, "Bearer nope", f"Bearer {KEYS['management']}", KEYS["inference"]])
def test_a_missing_or_wrong_token_is_a_json_401_that_never_reaches_torchserve(front, auth):
    Recorder.seen.clear()
    status, headers, raw = call(front["inference"], "POST", "/predictions/m", b"{}",
                                {"Authorization": auth} if auth else {})
    assert status == 401 and headers["www-authenticate"] == "Bearer" and headers["content-type"] == "application/json"
    body = json.loads(raw)
    assert body["type"] == "InvalidKeyException" and "/run/key_file.json" in body["error"]
    assert len(headers["x-request-id"]) == 32 and Recorder.seen == []
    if auth != f"Bearer {KEYS['management']}":  # that one opens the management port (checked below)
        status, _, _ = call(front["management"], "GET", "/models", headers={"Authorization": auth} if auth else {})
        assert status == 401 and Recorder.seen == []


def test_the_right_token_is_forwarded_without_the_authorization_header(front):
    Recorder.seen.clear()
    status, headers, raw = call(front["inference"], "POST", "/predictions/m", b"{}",
                                {**bearer(), "Content-Type": "application/json"})
    assert status == 200 and json.loads(raw) == {"ok": True} and headers["x-request-id"] == "ts-request-id"
    (seen,) = Recorder.seen
    assert "authorization" not in seen["headers"] and len(seen["headers"]["x-request-id"]) == 32
    status, _, _ = call(front["management"], "GET", "/models", headers=bearer("management"))
    assert status == 200 and "authorization" not in Recorder.seen[-1]["headers"]
    assert call(front["management"], "GET", "/models", headers=bearer("inference"))[0] == 401


@pytest.mark.parametrize("ctype,forwarded", [
    ("application/json", "application/json"), ("application/json; charset=utf-8", "application/json"),
    ("image/png", "image/png"), ("IMAGE/JPEG", "image/jpeg"),
    (None, "application/octet-stream"), ("application/x-www-form-urlencoded", "application/octet-stream"),
    ("multipart/form-data; boundary=", "application/octet-stream"), ("text/plain; charset=foo",
                                                                      "application/octet-stream"),
    ("application/jsonx", "application/octet-stream"), ("image/png\x7f", "application/octet-stream"),
])
def test_inference_bodies_keep_json_png_jpeg_and_everything_else_is_octet_stream(front, ctype, forwarded):
    Recorder.seen.clear()
    headers = {**bearer(), **({"Content-Type": ctype} if ctype else {})}
    status, _, _ = call(front["inference"], "POST", "/predictions/m", b"a=%zz", headers)
    if status == 400:  # a header value http.client or nginx itself refuses: a JSON 400, nothing forwarded
        assert Recorder.seen == []
        return
    assert status == 200
    assert Recorder.seen[-1]["headers"]["content-type"] == forwarded and Recorder.seen[-1]["body"] == b"a=%zz"


@pytest.mark.parametrize("size", [MAX_BODY + 1, 10 * MAX_BODY, 2_000_000])
def test_a_body_over_the_bound_is_a_json_413_naming_it(front, size):
    Recorder.seen.clear()
    status, headers, raw = call(front["inference"], "POST", "/predictions/m", b" " * size,
                                {**bearer(), "Content-Type": "application/json"})
    assert status == 413 and f"limit of {MAX_BODY} bytes" in json.loads(raw)["error"]
    assert headers["content-type"] == "application/json" and Recorder.seen == []


def test_a_chunked_body_over_the_bound_is_a_json_413_too(front):
    conn = http.client.HTTPConnection("127.0.0.1", front["inference"], timeout=30)
    try:
        conn.request("POST", "/predictions/m", body=iter([b" " * 3000] * 3), encode_chunked=True,
                     headers={**bearer(), "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and f"limit of {MAX_BODY} bytes" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_a_torchserve_that_does_not_answer_is_a_json_502_or_504(front):
    status, headers, raw = call(front["metrics"], "GET", "/metrics")  # nothing listens upstream
    assert status == 502 and json.loads(raw)["error"] == "TorchServe is not answering" and headers["x-request-id"]
    status, _, raw = call(front["inference"], "GET", "/slow", headers=bearer())  # upstream timeout 1 s
    assert status == 504 and "did not answer in time" in json.loads(raw)["error"]


def test_malformed_http_is_a_json_4xx(front):
    with socket.create_connection(("127.0.0.1", front["inference"]), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 400") and b'"error"' in head
    status, _, raw = call(front["inference"], "GET", "/" + "x" * 20000, headers=bearer())
    assert 400 <= status < 500 and "error" in json.loads(raw)


def test_every_request_gets_one_json_access_log_line(front):
    call(front["inference"], "POST", "/predictions/m", b"{}", {**bearer(), "Content-Type": "application/json"})
    log = Path(front["prefix"]) / "access.json.log"
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:  # the log is flushed within a second
        lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        if any(x["upstream_request_id"] == "ts-request-id" for x in lines):
            break
        time.sleep(0.3)
    assert any(x["upstream_request_id"] == "ts-request-id" and x["status"] == 200 for x in lines)
    assert {x["status"] for x in lines} >= {200, 401, 413}
    assert all(len(x["request_id"]) == 32 for x in lines) and KEYS["inference"] not in log.read_text()
