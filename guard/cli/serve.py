"""Start TorchServe on loopback with deploy/config.properties and deploy/metrics.yaml.

Runs from this Python's environment (its workers import the installed guard), in its own process
group, from a run directory (default ./.guard-serve) that receives the effective config, the logs,
the token key file and the state file `guard stop` reads.

--ingress none (the default): clients reach TorchServe's ports directly, with TorchServe's token
authorization (`Authorization: Bearer <key>` from RUN_DIR/key_file.json; without it TorchServe 0.12
answers 400 InvalidKeyException). --ingress nginx: nginx (from PATH; `apt-get install nginx`) listens
on the public ports in the same process group, config rendered from deploy/nginx/ into RUN_DIR/nginx/:
authentication at the ingress (keys made by guard serve in RUN_DIR/key_file.json; JSON 401 with
WWW-Authenticate: Bearer), bodies bounded with a JSON 413, only JSON, PNG, JPEG or octet-stream bodies
forwarded, JSON 502/504 when TorchServe does not answer, X-Request-Id on every answer, a JSON access
log; TorchServe itself listens on private loopback ports with its own token check off.
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
    p.add_argument("--ingress", choices=("none", "nginx"), default="none",
                   help="none (default): clients reach TorchServe's ports directly (TorchServe 0.12 then answers "
                        "500 to undecodable form bodies, an empty 413 above max_request_size and 400 for a "
                        "missing token); nginx: nginx from PATH in front (JSON 401/413/502/504, token checked "
                        "at the ingress), config from deploy/nginx/")
    p.add_argument("--ports", metavar="I,M,METRICS",
                   help="inference, management and metrics ports on 127.0.0.1 (default 8080,8081,8082 "
                        "from deploy/config.properties; 'auto' picks free ones)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the inference, management and metrics ports listen on (default 127.0.0.1; the "
                        "container image uses 0.0.0.0); behind --ingress nginx TorchServe itself stays on 127.0.0.1")
    p.add_argument("--run-dir", default=".guard-serve", help="where config, logs, key file and state go "
                   "(default ./.guard-serve)")
    p.add_argument("--config", help="TorchServe config.properties to start from (default deploy/config.properties)")
    p.add_argument("--metrics-config", help="metrics yaml (default deploy/metrics.yaml)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the models (default 240)")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops TorchServe")


def describe(server) -> str:
    """Human summary of a running server: addresses, key file, how to call and stop it."""
    nginx = server.ingress == "nginx"
    lines = [f"TorchServe is up (pid {server.pid}, process group {server.pid}) serving "
             f"{', '.join(server.models)}"
             + (f"; its ports listen on {server.host}" if server.host != "127.0.0.1" else ""),
             f"  inference   {server.urls['inference']}/predictions/NAME (also /v1/models/NAME:predict, "
             "/v2/models/NAME/infer)",
             f"  management  {server.urls['management']}",
             f"  metrics     {server.urls['metrics']}/metrics (no token needed)",
             f"  logs        {server.log} and {server.run_dir / 'logs'}",
             (f"  ingress     nginx (pid {server.ingress_pid}) on these three ports; config, error log and JSON "
              f"access log in {server.ingress_dir}; TorchServe itself on {server.upstream['inference']} and "
              f"{server.upstream['management']}"
              if nginx else "  ingress     none: clients reach TorchServe directly (--ingress nginx puts nginx in "
                            "front)"),
             f"  audit log   {server.run_dir / 'logs'}/guard-audit-NAME.log (one JSON line per rejected, repaired "
             "or flagged request; rotated by size; -PID per worker when a model has several)"]
    if server.token_auth and nginx:
        lines.append(f"  token auth ON at the ingress: keys in {server.key_file} (send 'Authorization: Bearer "
                     "<inference key>' to the inference port, the management key to the management port; even "
                     "/ping needs it; without it the answer is 401; the keys do not expire, a new guard serve makes "
                     "new ones; only the metrics port is open without a token)")
    elif server.token_auth:
        lines.append(f"  token auth ON: keys in {server.key_file} (send 'Authorization: Bearer <inference key>' to "
                     "the inference port, the management key to the management port; even /ping needs it; "
                     "without it TorchServe 0.12 answers 400 InvalidKeyException, not 401; keys expire after "
                     "60 min, the API key renews them; only the metrics port is open without a token)")
    else:
        lines.append("  token auth OFF (--no-auth): anyone who can reach these ports can call them")
    lines.append(f"  stop with:  guard stop --run-dir {server.run_dir}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import time

    from guard.torchserve import server as ts
    from guard.torchserve.config import parse_ports

    ts.require_java()
    if args.ingress == "nginx":
        from guard.torchserve.ingress import require_nginx

        require_nginx()  # one line and exit 2 before anything starts
    config = Path(args.config) if args.config else None
    ports = parse_ports(args.ports, config)
    models = dict(args.models) if args.models else None
    server = ts.start(args.model_store, models=models, run_dir=Path(args.run_dir), ports=ports,
                      token_auth=not args.no_auth, config=config, ingress=args.ingress, host=args.host,
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
        while server.alive() and server.ingress_alive():
            time.sleep(1.0)
        print("TorchServe or its ingress exited; see", server.log, "and", server.ingress_dir)
        server.stop()
        return 2
    except KeyboardInterrupt:
        print("stopping TorchServe ...", flush=True)
        server.stop()
        return 0
