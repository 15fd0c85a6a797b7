"""Start TorchServe on loopback with deploy/config.properties and deploy/metrics.yaml.

Runs from this Python's environment (its workers import the installed guard), in its own process
group, from a run directory (default ./.guard-serve) that receives the effective config, the logs,
TorchServe's token key file and the state file `guard stop` reads. Clients reach the inference and
management APIs through guard's gateway (guard/gateway.py: bounded bodies with a JSON 413, no
form decoding by TorchServe's frontend, 401 for a missing or wrong token); TorchServe itself listens
on private loopback ports; --no-gateway exposes it directly. Token authorization stays on unless
--no-auth: every inference and management call, even /ping, needs `Authorization: Bearer <key>`
from the key file.
The gRPC ports and the worker socket base port are set to free values so it can run beside another
TorchServe. TorchServe's own request bound (max_request_size) is set above every archive's
max_request_bytes, so an oversized request gets guard's JSON 413; logs, including guard's audit
logs, go to RUN_DIR/logs. Returns once every model has a READY worker (or, with --foreground, stays attached until
Ctrl-C, then stops the server)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "start TorchServe (loopback, token auth on) serving guarded .mar archives"


def _model_spec(text: str) -> tuple[str, str]:
    """``NAME=NAME.mar``, or ``NAME`` / ``NAME.mar`` alone."""
    name, sep, mar = text.partition("=")
    if not sep:
        mar = text if text.endswith(".mar") else f"{text}.mar"
        name = mar[: -len(".mar")]
    if not name or not mar:
        raise argparse.ArgumentTypeError(f"expected NAME=NAME.mar, got {text!r}")
    return name, mar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-store", required=True, help="directory holding the .mar archives")
    p.add_argument("--models", nargs="+", type=_model_spec, metavar="NAME=NAME.mar",
                   help="models to load (default: every .mar in the model store)")
    p.add_argument("--no-auth", action="store_true", help="turn TorchServe's token authorization off")
    p.add_argument("--no-gateway", action="store_true",
                   help="let clients reach TorchServe's ports directly, without guard's gateway (then TorchServe "
                        "0.12 answers 500 to undecodable form bodies, an empty 413 above max_request_size and "
                        "400 for a missing token)")
    p.add_argument("--ports", metavar="I,M,METRICS",
                   help="inference, management and metrics ports on 127.0.0.1 (default 8080,8081,8082 "
                        "from deploy/config.properties; 'auto' picks free ones)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the inference, management and metrics ports listen on (default 127.0.0.1; the "
                        "container image uses 0.0.0.0); TorchServe itself stays on 127.0.0.1 behind the gateway")
    p.add_argument("--run-dir", default=".guard-serve", help="where config, logs, key file and state go "
                   "(default ./.guard-serve)")
    p.add_argument("--config", help="TorchServe config.properties to start from (default deploy/config.properties)")
    p.add_argument("--metrics-config", help="metrics yaml (default deploy/metrics.yaml)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the models (default 240)")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops TorchServe")


def describe(server) -> str:
    """Human summary of a running server: addresses, key file, how to call and stop it."""
    lines = [f"TorchServe is up (pid {server.pid}, process group {server.pid}) serving "
             f"{', '.join(server.models)}"
             + (f"; its ports listen on {server.host}" if server.host != "127.0.0.1" else ""),
             f"  inference   {server.urls['inference']}/predictions/NAME",
             f"  management  {server.urls['management']}",
             f"  metrics     {server.urls['metrics']}/metrics (no token needed)",
             f"  logs        {server.log} and {server.run_dir / 'logs'}",
             (f"  gateway     on these three ports (log {server.run_dir / 'gateway.log'}); "
              f"TorchServe itself on {server.upstream['inference']} and {server.upstream['management']}"
              if server.gateway else "  gateway     off (--no-gateway): clients reach TorchServe directly"),
             f"  audit log   {server.run_dir / 'logs'}/guard-audit-NAME.log (one JSON line per rejected, repaired "
             "or flagged request; rotated by size; -PID per worker when a model has several)"]
    if server.token_auth:
        lines.append(f"  token auth ON: keys in {server.key_file} (send 'Authorization: Bearer <inference key>' to "
                     "the inference port, the management key to the management port; even /ping needs it; "
                     + ("without it the answer is 401; " if server.gateway else
                        "without it TorchServe 0.12 answers 400 InvalidKeyException, not 401; ")
                     + "keys expire after 60 min, the API key renews them; only the metrics port is open "
                     "without a token)")
    else:
        lines.append("  token auth OFF (--no-auth): anyone who can reach these ports can call them")
    lines.append(f"  stop with:  guard stop --run-dir {server.run_dir}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import time

    from guard.torchserve import server as ts

    ts.require_java()
    config = Path(args.config) if args.config else None
    ports = ts.parse_ports(args.ports, config)
    models = dict(args.models) if args.models else None
    server = ts.start(args.model_store, models=models, run_dir=Path(args.run_dir), ports=ports,
                      token_auth=not args.no_auth, config=config, gateway=not args.no_gateway, host=args.host,
                      metrics_config=Path(args.metrics_config) if args.metrics_config else None,
                      timeout=args.timeout)
    print(describe(server), flush=True)
    if not args.foreground:
        return 0
    import signal

    def _interrupt(signum, frame):  # SIGTERM (docker stop, systemd) stops TorchServe like Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while server.alive():
            time.sleep(1.0)
        print("TorchServe exited; see", server.log)
        server.stop()
        return 2
    except KeyboardInterrupt:
        print("stopping TorchServe ...", flush=True)
        server.stop()
        return 0
