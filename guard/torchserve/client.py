"""Talking to a running TorchServe from this machine: one HTTP call to 127.0.0.1, guard's metric lines, the
error type of the launcher."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from guard.errors import GuardError, InputError


class ServeError(GuardError):
    """TorchServe could not be started, did not get ready, or a run directory is already in use."""


def loopback(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(f"refusing to send traffic off the loopback interface: {url}")
    return url


def http(url: str, *, key: str | None = None, body: bytes | None = None, content_type: str | None = None,
         method: str | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP call to 127.0.0.1: ``(status, body)``; HTTP errors are returned, not raised."""
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(loopback(url), data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def guard_metric_lines(text: str) -> list[str]:
    """The sample lines of guard's metrics in a Prometheus text page (HELP/TYPE/buckets dropped)."""
    return [line for line in text.splitlines()
            if line.startswith("guard_") and "_bucket{" not in line]
