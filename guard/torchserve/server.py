"""Start a local TorchServe for ``guard serve``/``demo`` and the integration tests.

This module starts it; :mod:`guard.torchserve.config` writes its effective config, :mod:`guard.torchserve.ports`
picks free ports, :mod:`guard.torchserve.supervision` holds the started :class:`Server` (readiness, refusals,
stop) and :mod:`guard.torchserve.client` talks to it.

TorchServe runs from this Python's environment (so its workers import the installed ``guard``) with
``deploy/config.properties`` and ``deploy/metrics.yaml``: paths made absolute, every address on
127.0.0.1, and the ports that otherwise clash between two TorchServes on one host (gRPC 7070/7071, the
worker sockets ``/tmp/.ts.sock.9000+``) set to free values. It starts in its own process group (its
launcher, the JVM and the Python workers), in a run directory that receives the effective config,
``ts.log``, TorchServe's ``logs/``, its token ``key_file.json`` and ``serve.json``, the state file
``guard stop`` reads. ``TMPDIR`` points into the run directory so TorchServe's global pid file
(``$TMPDIR/.model_server.pid``) does not make a second instance refuse to start; ``LOG_LOCATION``
points at ``run_dir/logs``, where TorchServe's logs and guard's audit logs then land.

With ``ingress="nginx"`` (:mod:`guard.torchserve.ingress`) nginx listens on the public inference,
management and metrics ports and TorchServe on private loopback ports with its token authorization off:
nginx checks the bearer tokens (keys made by ``guard serve`` in ``key_file.json``), bounds bodies with a
JSON 413, forwards only JSON, PNG, JPEG or octet-stream bodies, and answers 502/504 in JSON when TorchServe
does not. nginx runs in TorchServe's process group, so ``guard stop`` stops both. With ``ingress="none"``
(the default) TorchServe listens on the public ports itself, with its own token authorization and its
frontend's answers to bad bodies and missing tokens. TorchServe's own request bound
(``max_request_size``) is set above the largest ``max_request_bytes`` of the served archives (twice it,
and never below TorchServe's default), so a body over guard's bound reaches the handler's JSON 413
(counted in guard's metrics) up to that size; above it nginx (or TorchServe) answers.
TorchServe's Open Inference Protocol routes (``/v2/health/ready``, ``/v2/health/live``, ``/v2``) are on
(``TS_OPEN_INFERENCE_PROTOCOL=oip``); ``/v2/models/NAME/infer`` reaches the handler either way.

Every wait is bounded in time; every HTTP call goes to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from guard._assets import handler_file
from guard.errors import InputError
from guard.torchserve import ingress as ingress_mod
from guard.torchserve.client import ServeError
from guard.torchserve.config import archive_max_request_bytes, read_properties, write_config
from guard.torchserve.ports import free_ports, port_free
from guard.torchserve.supervision import Server, proc_start_time, wait_ready

HANDLER = handler_file("guarded_handler.py")


BASELINE_HANDLER = handler_file("baseline_handler.py")


DEFAULT_RUN_DIR = ".guard-serve"


def venv_bin() -> Path:
    """The directory of this Python's console scripts (torchserve, torch-model-archiver)."""
    return Path(sys.executable).parent


def require_java() -> str:
    """Path of ``java`` (``$JAVA_HOME/bin/java`` first, as TorchServe does) or one clear error."""
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    found = shutil.which("java")
    if not found:
        raise InputError("Java 17 is required by TorchServe and `java` is not on PATH "
                         "(install openjdk-17-jre-headless or set JAVA_HOME)")
    return found


def require_script(name: str) -> Path:
    path = venv_bin() / name
    if not path.exists():
        raise InputError(f"{name} not found next to {sys.executable}: install guard's dependencies "
                         f"in this environment (pip install -e .)")
    return path


def start(model_store: str | Path, *, models: dict[str, str] | None = None, run_dir: str | Path = DEFAULT_RUN_DIR,
          ports: tuple[int, int, int] | None = None, token_auth: bool = True, config: Path | None = None,
          metrics_config: Path | None = None, timeout: float = 240.0, wait_for: list[str] | None = None,
          ingress: str = "none", host: str = "127.0.0.1") -> Server:
    """Start TorchServe on loopback and wait until every model has a READY worker (bounded by ``timeout``).

    With ``ingress="nginx"`` clients reach the inference, management and metrics ports through nginx on
    ``ports`` (:mod:`guard.torchserve.ingress`: JSON 401/413/502/504, bodies forwarded as JSON, PNG, JPEG or
    octet-stream) and TorchServe listens on free private loopback ports (``Server.upstream``) with its token
    authorization off: nginx checks the keys ``guard serve`` writes to ``key_file.json``. With ``"none"``
    TorchServe listens on ``ports`` itself, with its own token authorization.
    ``host`` is the address the public ports bind to (``0.0.0.0`` in a container); behind nginx TorchServe
    always stays on 127.0.0.1.

    ``models`` maps names to ``.mar`` files in ``model_store`` (default: every ``.mar`` there, by stem).
    ``wait_for`` names the models to wait for (default: all); a refusal to load by another model does
    not stop the start (tests load a deliberately broken archive beside a good one).
    On failure the process group is stopped and :class:`ServeError` (or :class:`ProfileMismatch`
    when guard's handler refused a profile) says why, with the log's tail.
    """
    require_java()
    torchserve = require_script("torchserve")
    store, models = _served_models(model_store, models)
    if ingress not in ingress_mod.INGRESSES:
        raise InputError(f"unknown ingress {ingress!r}: use one of {', '.join(ingress_mod.INGRESSES)}")
    nginx = ingress_mod.require_nginx() if ingress == "nginx" else None
    run = _claim_run_dir(run_dir)
    ports = ports or tuple(free_ports(3))  # type: ignore[assignment]
    for port in ports:
        if not port_free(port, host):
            raise ServeError(f"port {port} on {host} is in use: pick others with --ports (or --ports auto)")
    load = ",".join(f"{n}={m}" for n, m in models.items())
    ts_ports = tuple(free_ports(3)) if nginx else ports
    cfg = write_config(run, model_store=store, load_models=load, ports=ts_ports, token_auth=token_auth and not nginx,
                       config=config, metrics_config=metrics_config, host="127.0.0.1" if nginx else host,
                       handler_bounds=[archive_max_request_bytes(store / m) for m in models.values()])
    (run / "key_file.json").unlink(missing_ok=True)  # never read a previous run's keys
    prefix = run / "nginx"
    if nginx:
        _write_ingress(nginx, prefix, run, host=host, ports=ports, upstream=ts_ports, cfg=cfg, token_auth=token_auth)
    tmp = run / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp),
           "LOG_LOCATION": str(run / "logs"), "METRICS_LOCATION": str(run / "logs"),
           "TS_OPEN_INFERENCE_PROTOCOL": "oip"}  # /v2/health/ready, /v2/health/live, /v2
    env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
    log_path = run / "ts.log"
    cmd = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(cfg)]
    if not token_auth or nginx:
        cmd.append("--disable-token-auth")  # behind nginx the ingress checks the tokens
    urls = {"inference": f"http://127.0.0.1:{ports[0]}", "management": f"http://127.0.0.1:{ports[1]}",
            "metrics": f"http://127.0.0.1:{ports[2]}"}
    server = Server(pid=0, run_dir=run, models=list(models), token_auth=token_auth, config=cfg, log=log_path,
                    urls=urls, host=host, ingress=ingress, upstream={"inference": f"http://127.0.0.1:{ts_ports[0]}",
                                                      "management": f"http://127.0.0.1:{ts_ports[1]}",
                                                      "metrics": f"http://127.0.0.1:{ts_ports[2]}"})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=run, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, process_group=0)  # its own group; nginx joins it
    server.pid, server.start_time = proc.pid, proc_start_time(proc.pid)
    server.save()
    front = None
    try:
        if nginx:  # in TorchServe's process group: guard stop's signal to the group reaches it
            with open(prefix / "nginx.out", "w") as out:
                front = subprocess.Popen(ingress_mod.command(nginx, prefix), cwd=prefix, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         process_group=proc.pid)
            server.ingress_pid, server.ingress_start_time = front.pid, proc_start_time(front.pid)
            server.save()
        wait_ready(server, proc, timeout=timeout, models=wait_for, ingress=front)
    except BaseException:
        server.stop()
        raise
    return server


def _served_models(model_store: str | Path, models: dict[str, str] | None) -> tuple[Path, dict[str, str]]:
    """The model store and the ``name -> .mar`` map to load (every archive there by default), checked."""
    store = Path(model_store).resolve()
    if not store.is_dir():
        raise InputError(f"model store not found: {store}")
    if not models:
        models = {p.stem: p.name for p in sorted(store.glob("*.mar"))}
        if not models:
            raise InputError(f"no .mar archives in {store}: create one with guard archive")
    for name, mar in models.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
            raise InputError(f"invalid model name {name!r}")
        if not (store / mar).is_file():
            raise InputError(f"{mar} not found in the model store {store}")
    return store, models


def _claim_run_dir(run_dir: str | Path) -> Path:
    """The run directory, created; refused while a TorchServe started from it still runs."""
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    previous = Server.load(run)
    if previous is not None and previous.alive():
        raise ServeError(f"a TorchServe started from {run} is still running (pid {previous.pid}): "
                         f"run `guard stop --run-dir {run}` first")
    return run


def _write_ingress(nginx: str, prefix: Path, run: Path, *, host: str, ports: tuple[int, int, int],
                   upstream: tuple[int, int, int], cfg: Path, token_auth: bool) -> None:
    """nginx's config in ``prefix`` (with the keys it checks, made now, when ``token_auth``), checked by nginx."""
    keys = ingress_mod.make_keys(run / "key_file.json") if token_auth else None
    values = ingress_mod.template_values(
        host=host, ports=ports, upstream=upstream, max_body=int(read_properties(cfg)["max_request_size"]),
        keys={k: v["key"] for k, v in keys.items()} if keys else None,
        key_hint=f"keys in {run / 'key_file.json'}", log_dir=prefix)
    ingress_mod.write_config(prefix, values)
    ingress_mod.validate_nginx_config(nginx, prefix)
