"""Free loopback ports for a TorchServe: the public three, gRPC's two and a base for the worker sockets."""

from __future__ import annotations

import socket
from pathlib import Path

from guard.torchserve.client import ServeError


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``host:port`` (connections left in TIME_WAIT by a stopped server do not count,
    as TorchServe and nginx bind with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def worker_port() -> int:
    """A base port for the worker sockets whose ``/tmp/.ts.sock.PORT`` (and a few after) is unused."""
    for _ in range(50):
        port = free_ports(1)[0]
        if port < 60000 and not any(Path(f"/tmp/.ts.sock.{port + i}").exists() for i in range(8)):
            return port
    raise ServeError("could not find a free base port for TorchServe's worker sockets")
