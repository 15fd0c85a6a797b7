"""A small reverse proxy in front of TorchServe's inference and management ports (``guard serve``).

Why it exists: three answers of TorchServe 0.12's frontend break the endpoint's HTTP contract and
never reach guard's handler, so the handler cannot fix them:

* a ``application/x-www-form-urlencoded`` body whose percent escapes do not decode (``curl -d`` and
  urllib send that type by default) is answered **500** ``ErrorDataDecoderException``;
* a body over ``max_request_size`` is answered 413 with an **empty body**, sometimes after resetting
  the connection while the client is still sending;
* a missing or wrong token is answered **400** ``InvalidKeyException``, where clients and alerting
  expect 401.

The gateway listens on the public ports and forwards to TorchServe on private loopback ports:

* bodies are bounded before anything is forwarded (``Content-Length`` checked first, chunked bodies
  read up to the bound): over it, 413 with a JSON error naming the bound, the connection closed. The
  bound is TorchServe's own ``max_request_size``, which ``guard serve`` sets to twice the handlers'
  ``max_request_bytes``: a body between the two still reaches the handler, which answers its JSON 413
  and counts it in ``guard_requests_total``; the gateway answers only what TorchServe would cut;
* on the inference API the frontend's form decoders never see a body: they answer 500 (or a 403
  ``UnsupportedCharsetException``) to a form body with a bad percent escape, a part with an unknown
  charset or an empty boundary. A ``multipart/form-data`` body (``curl -F data=@img.png``) is unpacked
  here, its ``data`` (or ``body``, else first) part sent on as the body; JSON, PNG and JPEG keep their
  bare media type; any other type goes on as ``application/octet-stream``, so the handler sniffs the
  body (JSON or an image) and answers 400 itself if it is neither;
* TorchServe's ``400 InvalidKeyException`` goes back as **401** with ``WWW-Authenticate: Bearer``;
  TorchServe still checks every token itself: the gateway keeps no keys;
* every other answer (status, headers such as ``x-request-id``, body) is relayed unchanged, and a
  TorchServe that does not answer gives a JSON 502/504; errors of the gateway's own HTTP parsing (bad
  request line, unknown method, headers too large) are JSON 4xx as well;
* the answers it gives itself never reach guard's handler, so they are not in ``guard_requests_total``;
  they are counted in ``guard_gateway_responses_total{api, code}``, which the gateway appends to
  TorchServe's Prometheus page when it also fronts the metrics port (as ``guard serve`` does).

``guard serve`` runs it as ``python -m guard.torchserve.gateway SPEC.json --child-log ts.log -- torchserve ...``:
the gateway leads a new process group and starts TorchServe inside it, so ``guard stop`` (which signals
the group) stops both, and the gateway exits with TorchServe's exit code when TorchServe ends.
Threads: one per client connection, each with its own keep-alive connection upstream.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LOG = logging.getLogger("guard.torchserve.gateway")

# Content types the inference API forwards as they are; anything else goes on as octet-stream.
INFERENCE_TYPES = ("application/json", "image/png", "image/jpeg")
MULTIPART = "multipart/form-data"
FORM_FIELDS = ("data", "body")  # the part names TorchServe's handlers read, in order
INFERENCE_PREFIXES = ("/predictions/", "/explanations/", "/v1/models/", "/v2/models/")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length", "host"})
DEFAULT_MAX_BODY = 1_048_576
DEFAULT_UPSTREAM_TIMEOUT = 130.0  # above TorchServe's default_response_timeout (120 s)
CLIENT_IDLE_TIMEOUT = 60.0  # a client connection idle (or trickling a body) this long is closed
MAX_CONNECTIONS = 256
# After a 413 the gateway reads (and drops) up to this many body bytes before closing, so a client that
# sends its whole body before reading gets the 413 instead of a connection reset.
DRAIN_MAX = 64 * 1024 * 1024


@dataclass
class Route:
    """One public listener and the TorchServe address it forwards to."""

    name: str  # "inference" or "management"
    host: str
    port: int
    upstream: str  # "http://127.0.0.1:PORT"

    @property
    def inference(self) -> bool:
        return self.name == "inference"


@dataclass
class Spec:
    """What ``guard serve`` writes to ``RUN_DIR/gateway.json`` for the gateway process."""

    routes: list[Route]
    max_body: int = DEFAULT_MAX_BODY
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    key_hint: str = ""  # where the operator finds the keys (said in 401 answers)

    def to_json(self) -> str:
        return json.dumps({"routes": [vars(r) for r in self.routes], "max_body": self.max_body,
                           "upstream_timeout": self.upstream_timeout,
                           "key_hint": self.key_hint}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        raw = json.loads(text)
        return cls(routes=[Route(**r) for r in raw["routes"]], max_body=int(raw["max_body"]),
                   upstream_timeout=float(raw.get("upstream_timeout", DEFAULT_UPSTREAM_TIMEOUT)),
                   key_hint=str(raw.get("key_hint", "")))


class _Reject(Exception):
    """An answer the gateway gives itself (status and message), without asking TorchServe."""

    def __init__(self, status: int, message: str, *, close: bool = False, drain: int = 0):
        super().__init__(message)
        self.status, self.message, self.close, self.drain = status, message, close, drain


def media_type(value: str | None) -> str:
    """``type/subtype`` of a Content-Type header, lower case, parameters dropped."""
    return (value or "").split(";", 1)[0].strip().lower()


def is_inference(path: str) -> bool:
    return urllib.parse.urlsplit(path).path.startswith(INFERENCE_PREFIXES)


def inference_body(body: bytes, content_type: str | None) -> tuple[bytes, str]:
    """What the inference API forwards for a client's ``body`` and ``Content-Type``: JSON, PNG and JPEG
    keep their bare media type; a multipart form is unpacked to its ``data``/``body`` (else first) part;
    anything else becomes ``application/octet-stream`` for the handler to sniff. A multipart body that
    cannot be unpacked raises a 400."""
    ctype = media_type(content_type)
    if ctype in INFERENCE_TYPES:
        return body, ctype
    if ctype != MULTIPART:
        return body, "application/octet-stream"
    import email.parser
    import email.policy

    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    try:
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
        if not msg.get_boundary():
            raise ValueError("no boundary")
        parts = [p for p in (msg.get_payload() if msg.is_multipart() else []) if not p.is_multipart()]
        if not parts:
            raise ValueError("no parts")
        named = {p.get_param("name", header="content-disposition"): p for p in parts}
        part = next((named[n] for n in FORM_FIELDS if n in named), parts[0])
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            raise ValueError("no payload")
        inner = media_type(part.get_content_type())
    except Exception as e:  # noqa: BLE001 - whatever a hostile form does, the client gets a 400
        raise _Reject(400, f"unreadable multipart/form-data body ({type(e).__name__}): send a 'data' "
                           "part holding the JSON or image") from None
    return data, inner if inner in INFERENCE_TYPES else "application/octet-stream"


def _read_chunked(rfile, bound: int) -> bytes:
    """A chunked request body, refused (413) once it passes ``bound`` bytes."""
    out = bytearray()
    while True:
        line = rfile.readline(1026)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _Reject(400, "malformed chunked request body", close=True) from None
        if size < 0:
            raise _Reject(400, "malformed chunked request body", close=True)
        if size == 0:
            while rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        if len(out) + size > bound:
            raise _Reject(413, f"request body is over the limit of {bound} bytes", close=True)
        chunk = rfile.read(size)
        if len(chunk) != size:
            raise _Reject(400, "request body ended early", close=True)
        out += chunk
        rfile.readline(3)


class GatewayMetrics:
    """``guard_gateway_responses_total{api, code}``: the answers the gateway gave itself (401s included),
    in a registry of its own whose text exposition is appended to TorchServe's metrics page."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter

        self.registry = CollectorRegistry()
        self.responses = Counter("guard_gateway_responses", "Answers guard's gateway gave itself, without "
                                 "guard's handler (401, 413 over TorchServe's bound, unreadable forms, 5xx "
                                 "when TorchServe does not answer)", ["api", "code"], registry=self.registry)

    def count(self, api: str, code: int) -> None:
        self.responses.labels(api=api, code=str(code)).inc()

    def exposition(self) -> bytes:
        """The counter's text exposition (without prometheus-client's ``_created`` timestamps)."""
        from prometheus_client import generate_latest

        lines = generate_latest(self.registry).splitlines(keepends=True)
        return b"".join(ln for ln in lines if not ln.startswith(b"guard_gateway_responses_created"))


class _ClientGone(Exception):
    """The client closed or stalled while sending its body."""


class _Upstream(threading.local):
    """One keep-alive connection to TorchServe per gateway thread."""

    conn: http.client.HTTPConnection | None = None


def make_handler(spec: Spec, route: Route, slots: threading.BoundedSemaphore,
                 metrics: GatewayMetrics | None = None) -> type[BaseHTTPRequestHandler]:
    """The request handler class of one listener (``route``); ``metrics`` counts the gateway's own answers
    and, on the ``metrics`` route, is appended to TorchServe's ``/metrics`` page."""
    target = urllib.parse.urlsplit(route.upstream)
    upstream = _Upstream()

    class GatewayHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.1"  # even an unparsable request line gets a status line
        server_version = "guard-gateway"
        sys_version = ""
        timeout = CLIENT_IDLE_TIMEOUT

        # -- answers the gateway gives itself -------------------------------------------------
        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (bad request line, headers too large ...), as JSON; an unknown
            method (http.server's 501) is a client error here: 405."""
            if code == 501:
                code, message = 405, f"method {self.command!r} is not allowed"
            self._json(code, message or self.responses.get(code, ("error",))[0], close=True)

        def _json(self, status: int, message: str, *, close: bool = False, extra: dict[str, str] | None = None,
                  payload: dict[str, Any] | None = None) -> None:
            body = json.dumps(payload or {"code": status, "error": message}).encode()
            if metrics is not None:
                metrics.count(route.name, status)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
            except OSError:
                self.close_connection = True

        def handle_expect_100(self) -> bool:
            """Refuse an over-bound body before the client sends it."""
            try:
                self._declared_length(spec.max_body)
            except _Reject as r:
                self._json(r.status, r.message, close=True)
                return False
            return super().handle_expect_100()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            pass  # no access log (TorchServe keeps one); errors go through LOG

        # -- forwarding ---------------------------------------------------------------------
        def _declared_length(self, bound: int) -> int | None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return None
            raw = self.headers.get("Content-Length")
            if raw is None:
                return 0
            if not raw.strip().isdigit():
                raise _Reject(400, f"invalid Content-Length {raw[:40]!r}", close=True)
            n = int(raw)
            if n > bound:
                raise _Reject(413, f"request body is {n} bytes, above the limit of {bound} bytes", close=True,
                              drain=n if n <= DRAIN_MAX else 0)
            return n

        def _body(self) -> bytes:
            bound = spec.max_body
            n = self._declared_length(bound)
            try:
                if n is None:
                    return _read_chunked(self.rfile, bound)
                body = self.rfile.read(n) if n else b""
            except OSError as e:  # the client went away or stalled mid-body: nothing to answer
                raise _ClientGone from e
            if len(body) != n:
                raise _Reject(400, "request body ended before its Content-Length", close=True)
            return body

        def _outgoing(self, body: bytes) -> tuple[bytes, dict[str, str]]:
            """The body and headers sent to TorchServe (hop-by-hop headers dropped)."""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if route.inference and self.command in ("POST", "PUT") and is_inference(self.path):
                headers.pop("Content-Type", None)
                headers.pop("content-type", None)
                body, headers["Content-Type"] = inference_body(body, self.headers.get("Content-Type"))
            headers["Host"] = target.netloc
            headers["Content-Length"] = str(len(body))
            return body, headers

        def _exchange(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            body, headers = self._outgoing(body)
            for attempt in (0, 1):
                fresh = upstream.conn is None
                if fresh:
                    upstream.conn = http.client.HTTPConnection(target.hostname, target.port,
                                                               timeout=spec.upstream_timeout)
                conn = upstream.conn
                try:
                    conn.request(self.command, self.path, body=body if body or self.command in
                                 ("POST", "PUT", "PATCH") else None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.will_close:
                        conn.close()
                        upstream.conn = None
                    return resp.status, resp.getheaders(), data
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    conn.close()
                    upstream.conn = None
                    if fresh or attempt:  # a kept-alive connection the server closed: retry once, fresh
                        raise
                except BaseException:
                    conn.close()
                    upstream.conn = None
                    raise
            raise AssertionError("unreachable")

        def _forward(self) -> None:
            if not slots.acquire(blocking=False):
                self._json(503, f"the gateway has {MAX_CONNECTIONS} requests in flight; retry later", close=True)
                return
            try:
                status, headers, data = self._exchange(self._body())
            except _Reject as r:
                self._json(r.status, r.message, close=r.close)
                self._drain(r.drain)
                return
            except _ClientGone:
                self.close_connection = True
                return
            except TimeoutError:
                LOG.warning("TorchServe (%s) did not answer %s %s within %.0fs", route.upstream, self.command,
                            self.path, spec.upstream_timeout)
                self._json(504, "TorchServe did not answer in time", close=True)
                return
            except OSError as e:
                LOG.warning("TorchServe (%s) unreachable for %s %s: %s", route.upstream, self.command, self.path, e)
                self._json(502, "TorchServe is not answering", close=True)
                return
            finally:
                slots.release()
            if status == 400 and _invalid_key(data):
                hint = f" (keys: {spec.key_hint})" if spec.key_hint else ""
                self._json(401, f"missing or invalid token: send 'Authorization: Bearer <{route.name} key>'{hint}",
                           extra={"WWW-Authenticate": "Bearer"},
                           payload={"code": 401, "type": "InvalidKeyException",
                                    "error": f"missing or invalid token: send 'Authorization: Bearer "
                                             f"<{route.name} key>'{hint}"})
                return
            if (metrics is not None and route.name == "metrics" and status == 200
                    and urllib.parse.urlsplit(self.path).path == "/metrics"):
                data = data.rstrip(b"\n") + b"\n" + metrics.exposition()
            self._relay(status, headers, data)

        def _drain(self, n: int) -> None:
            """Read and drop ``n`` body bytes the client is still sending (bounded by the idle timeout)."""
            try:
                while n > 0 and (chunk := self.rfile.read(min(n, 1 << 16))):
                    n -= len(chunk)
            except OSError:
                pass

        def _relay(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
            try:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            except OSError:
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _forward

    return GatewayHandler


def _invalid_key(data: bytes) -> bool:
    try:
        return json.loads(data).get("type") == "InvalidKeyException"
    except (ValueError, AttributeError):
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def serve(spec: Spec, *, ready: Callable[[list[_Server]], None] | None = None,
          child: subprocess.Popen | None = None) -> int:
    """Run one listener per route until SIGTERM/SIGINT, ``shutdown()`` of every listener, or the end of
    ``child`` (TorchServe), whose exit code is returned."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    metrics = GatewayMetrics()
    servers = [_Server((r.host, r.port), make_handler(spec, r, slots, metrics)) for r in spec.routes]
    threads = [threading.Thread(target=s.serve_forever, name=f"gateway-{r.name}", daemon=True)
               for s, r in zip(servers, spec.routes)]
    for t in threads:
        t.start()
    for s, r in zip(servers, spec.routes):
        LOG.info("gateway %s listening on %s:%d -> %s", r.name, r.host, s.server_address[1], r.upstream)
    if ready is not None:
        ready(servers)
    try:
        if child is not None:
            code = child.wait()
            LOG.warning("TorchServe exited with code %s: the gateway stops too", code)
            return int(code)
        for t in threads:
            t.join()
        return 0
    finally:
        for s in servers:
            if child is not None:
                s.shutdown()  # the serving threads are still running
            s.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guard.torchserve.gateway", description=__doc__.split("\n", 1)[0])
    p.add_argument("spec", help="gateway.json written by guard serve")
    p.add_argument("--child-log", help="file for the child's stdout and stderr")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.child = argv[split + 1:]  # after --: the TorchServe command, run in this process group
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    spec = Spec.from_json(Path(args.spec).read_text())

    child = None
    if args.child:
        with open(args.child_log or os.devnull, "w") as log:
            child = subprocess.Popen(args.child, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _stop(signum: int, frame: Any) -> None:
        LOG.info("gateway stopping (signal %d)", signum)
        if child is not None and child.poll() is None:
            child.terminate()  # also signalled when the whole group is; harmless twice
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        return serve(spec, child=child)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
