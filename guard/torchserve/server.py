"""Start, probe and stop a local TorchServe for ``guard serve``/``stop``/``demo`` and the integration tests.

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

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guard._assets import deploy_file, handler_file
from guard.errors import GuardError, InputError, ProfileMismatch
from guard.serving import DEFAULT_MAX_REQUEST_BYTES as HANDLER_DEFAULT_MAX_REQUEST_BYTES
from guard.serving import REFUSAL_MARK
from guard.torchserve import ingress as ingress_mod

DEPLOY = deploy_file("config.properties").parent  # the installed serving configs (guard/_assets)
HANDLER = handler_file("guarded_handler.py")
BASELINE_HANDLER = handler_file("baseline_handler.py")
STATE_NAME = "serve.json"
DEFAULT_RUN_DIR = ".guard-serve"
TS_DEFAULT_MAX_REQUEST_SIZE = 6_553_500  # TorchServe 0.12's max_request_size default


class ServeError(GuardError):
    """TorchServe could not be started, did not get ready, or a run directory is already in use."""


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


def _loopback(url: str) -> str:
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
    req = urllib.request.Request(_loopback(url), data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blanks skipped)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


def default_ports(config: Path | None = None) -> tuple[int, int, int]:
    """Inference, management and metrics ports of ``deploy/config.properties`` (8080, 8081, 8082)."""
    props = read_properties(config or DEPLOY / "config.properties")
    out = []
    for key, default in (("inference_address", 8080), ("management_address", 8081), ("metrics_address", 8082)):
        port = urllib.parse.urlsplit(props.get(key, "")).port
        out.append(port or default)
    return out[0], out[1], out[2]


def parse_ports(text: str | None, config: Path | None = None) -> tuple[int, int, int]:
    """``--ports I,M,METRICS`` (or ``auto`` for free ports); default from the config file."""
    if not text:
        return default_ports(config)
    if text.strip().lower() == "auto":
        a, b, c = free_ports(3)
        return a, b, c
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise InputError(f"--ports expects INFERENCE,MANAGEMENT,METRICS (e.g. 8080,8081,8082) or auto, "
                         f"got {text!r}") from None
    if len(ports) != 3 or len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
        raise InputError(f"--ports needs three distinct ports in 1..65535, got {text!r}")
    return ports[0], ports[1], ports[2]


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on ``host:port`` (connections left in TIME_WAIT by a stopped server do not count,
    as TorchServe and nginx bind with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _worker_port() -> int:
    """A base port for the worker sockets whose ``/tmp/.ts.sock.PORT`` (and a few after) is unused."""
    for _ in range(50):
        port = free_ports(1)[0]
        if port < 60000 and not any(Path(f"/tmp/.ts.sock.{port + i}").exists() for i in range(8)):
            return port
    raise ServeError("could not find a free base port for TorchServe's worker sockets")


def archive_max_request_bytes(mar: Path) -> int:
    """The ``handler.max_request_bytes`` an archive's model-config.yaml sets (the handler default if none)."""
    import yaml

    try:
        with zipfile.ZipFile(mar) as z:
            cfg = yaml.safe_load(z.read("model-config.yaml")) or {}
        return int((cfg.get("handler") or {}).get("max_request_bytes", HANDLER_DEFAULT_MAX_REQUEST_BYTES))
    except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile, yaml.YAMLError):
        return HANDLER_DEFAULT_MAX_REQUEST_BYTES


def frontend_max_request_size(handler_bounds: list[int], configured: int | None = None) -> int:
    """TorchServe's ``max_request_size`` for handlers bounded at ``handler_bounds`` bytes.

    Twice the largest bound (so over-bound bodies up to that size reach the handler, which answers a JSON
    413), never below TorchServe's default nor below an explicitly ``configured`` larger value.
    """
    return max(2 * max(handler_bounds or [HANDLER_DEFAULT_MAX_REQUEST_BYTES]), TS_DEFAULT_MAX_REQUEST_SIZE,
               int(configured or 0))


def write_config(run_dir: Path, *, model_store: Path, load_models: str, ports: tuple[int, int, int],
                 token_auth: bool, config: Path | None = None, metrics_config: Path | None = None,
                 handler_bounds: list[int] | None = None, host: str = "127.0.0.1") -> Path:
    """The effective config.properties in ``run_dir``: deploy's keys, absolute paths, ports on ``host`` (loopback
    unless a container binds all interfaces), gRPC on loopback, and a frontend request bound above every
    handler's (:func:`frontend_max_request_size`)."""
    src = Path(config or DEPLOY / "config.properties")
    metrics = Path(metrics_config or DEPLOY / "metrics.yaml").resolve()
    if not src.is_file():
        raise InputError(f"TorchServe config not found: {src}")
    if not metrics.is_file():
        raise InputError(f"metrics config not found: {metrics}")
    grpc_i, grpc_m = free_ports(2)
    configured = read_properties(src).get("max_request_size")
    override = {
        "inference_address": f"http://{host}:{ports[0]}",
        "management_address": f"http://{host}:{ports[1]}",
        "metrics_address": f"http://{host}:{ports[2]}",
        "metrics_config": str(metrics),
        "model_store": str(Path(model_store).resolve()),
        "grpc_inference_address": "127.0.0.1",
        "grpc_management_address": "127.0.0.1",
        "grpc_inference_port": str(grpc_i),
        "grpc_management_port": str(grpc_m),
        "initial_worker_port": str(_worker_port()),
        "load_models": load_models,
        "max_request_size": str(frontend_max_request_size(
            list(handler_bounds or []), int(configured) if configured and configured.isdigit() else None)),
    }
    if not token_auth:
        override["disable_token_authorization"] = "true"
    lines, seen = [], set()
    for line in src.read_text().splitlines():
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in override:
            lines.append(f"{key}={override[key]}")
            seen.add(key)
        elif key == "disable_token_authorization" and token_auth:
            continue  # `guard serve` keeps token auth on unless --no-auth
        else:
            lines.append(line)
    lines += ["", "# added by guard serve"] + [f"{k}={v}" for k, v in override.items() if k not in seen]
    out = run_dir / "config.properties"
    out.write_text("\n".join(lines) + "\n")
    return out


def _proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` from /proc (guards ``guard stop`` against a recycled pid), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class Server:
    """A TorchServe this module started: its process group, addresses, token key file and logs."""

    pid: int
    run_dir: Path
    urls: dict[str, str]
    models: list[str]
    token_auth: bool
    config: Path
    log: Path
    start_time: str | None = None
    started_at: float = field(default_factory=time.time)
    upstream: dict[str, str] = field(default_factory=dict)  # TorchServe's own ports (behind the ingress)
    host: str = "127.0.0.1"  # where the public ports listen (``urls`` always name 127.0.0.1, for local calls)
    ingress: str = "none"  # "nginx": clients reach TorchServe through nginx (guard.torchserve.ingress)
    ingress_pid: int = 0
    ingress_start_time: str | None = None

    @property
    def ingress_dir(self) -> Path:
        """nginx's prefix: rendered config, pid file, error log and the JSON access log."""
        return self.run_dir / "nginx"

    def ingress_alive(self) -> bool:
        """nginx's master is running (True without an ingress)."""
        if self.ingress != "nginx":
            return True
        try:
            os.kill(self.ingress_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        st = _proc_start_time(self.ingress_pid)
        return self.ingress_start_time is None or st is None or st == self.ingress_start_time

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    @property
    def model_log(self) -> Path:
        return self.run_dir / "logs" / "model_log.log"

    def keys(self) -> dict[str, Any]:
        """TorchServe's key_file.json (``inference``, ``management``, ``API`` keys); {} without auth."""
        if not self.token_auth:
            return {}
        try:
            return json.loads(self.key_file.read_text())
        except (OSError, ValueError):
            return {}

    def key(self, kind: str = "inference") -> str | None:
        entry = self.keys().get(kind)
        return entry.get("key") if isinstance(entry, dict) else None

    def alive(self) -> bool:
        if not _group_alive(self.pid):
            return False
        st = _proc_start_time(self.pid)
        return self.start_time is None or st is None or st == self.start_time

    def save(self) -> Path:
        state = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        path = self.run_dir / STATE_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, run_dir: Path) -> Server | None:
        path = Path(run_dir) / STATE_NAME
        if not path.is_file():
            return None
        try:
            s = json.loads(path.read_text())
            return cls(pid=int(s["pid"]), run_dir=Path(s["run_dir"]), urls=dict(s["urls"]),
                       models=list(s["models"]), token_auth=bool(s["token_auth"]), config=Path(s["config"]),
                       log=Path(s["log"]), start_time=s.get("start_time"), started_at=float(s["started_at"]),
                       upstream=dict(s.get("upstream") or {}), host=str(s.get("host", "127.0.0.1")),
                       ingress=str(s.get("ingress", "none")), ingress_pid=int(s.get("ingress_pid") or 0),
                       ingress_start_time=s.get("ingress_start_time"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ServeError(f"{path} is not a guard serve state file: {e}") from None

    def model_ready(self, name: str) -> bool:
        status, body = http(f"{self.urls['management']}/models/{name}", key=self.key("management"), timeout=5)
        if status != 200:
            return False
        try:
            info = json.loads(body)
            workers = info[0]["workers"] if isinstance(info, list) else info["workers"]
            return any(w.get("status") == "READY" for w in workers)
        except (ValueError, KeyError, IndexError, TypeError):
            return False

    def refusal(self, model: str | None = None) -> str | None:
        """The handler's refusal line from the model log, if a model (``model``, or any) refused to load."""
        for path in (self.model_log, self.log):
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for line in text.splitlines():
                if REFUSAL_MARK in line:
                    found = line[line.index(REFUSAL_MARK):][:500]
                    if model is None or f"model {model}:" in found:
                        return found
        return None

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for path in (self.ingress_dir / "error.log", self.log, self.model_log):
            try:
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]))
            except OSError:
                pass
        return "\n".join(parts)

    def _reap_children(self) -> None:
        """Collect the exit status of the group members this process started (TorchServe's launcher and
        nginx): an unreaped child stays a zombie, and a group of zombies still answers ``killpg(.., 0)``."""
        _reap(self.pid)
        if self.ingress_pid:
            _reap(self.ingress_pid)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM the process group, wait (bounded), SIGKILL what is left; remove the state file.

        Returns True if a live server was stopped. Only this server's own process group is signalled,
        and only while its leader is the process that was started (start time checked).
        """
        stopped = False
        if self.alive():
            stopped = True
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _group_alive(self.pid) and time.monotonic() < deadline:
                self._reap_children()
                time.sleep(0.2)
            if _group_alive(self.pid):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while _group_alive(self.pid) and time.monotonic() < deadline:
                    self._reap_children()
                    time.sleep(0.2)
        self._reap_children()
        (self.run_dir / STATE_NAME).unlink(missing_ok=True)
        return stopped


def _reap(pid: int) -> None:
    """Collect the exit status of our own child (no zombie keeps the group 'alive')."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


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
    if ingress not in ingress_mod.INGRESSES:
        raise InputError(f"unknown ingress {ingress!r}: use one of {', '.join(ingress_mod.INGRESSES)}")
    nginx = ingress_mod.require_nginx() if ingress == "nginx" else None
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    previous = Server.load(run)
    if previous is not None and previous.alive():
        raise ServeError(f"a TorchServe started from {run} is still running (pid {previous.pid}): "
                         f"run `guard stop --run-dir {run}` first")
    ports = ports or tuple(free_ports(3))  # type: ignore[assignment]
    for port in ports:
        if not _port_free(port, host):
            raise ServeError(f"port {port} on {host} is in use: pick others with --ports (or --ports auto)")
    load = ",".join(f"{n}={m}" for n, m in models.items())
    ts_ports = tuple(free_ports(3)) if nginx else ports
    cfg = write_config(run, model_store=store, load_models=load, ports=ts_ports, token_auth=token_auth and not nginx,
                       config=config, metrics_config=metrics_config, host="127.0.0.1" if nginx else host,
                       handler_bounds=[archive_max_request_bytes(store / m) for m in models.values()])
    (run / "key_file.json").unlink(missing_ok=True)  # never read a previous run's keys
    prefix = run / "nginx"
    if nginx:
        keys = ingress_mod.make_keys(run / "key_file.json") if token_auth else None
        values = ingress_mod.template_values(
            host=host, ports=ports, upstream=ts_ports, max_body=int(read_properties(cfg)["max_request_size"]),
            keys={k: v["key"] for k, v in keys.items()} if keys else None,
            key_hint=f"keys in {run / 'key_file.json'}", log_dir=prefix)
        ingress_mod.write_config(prefix, values)
        ingress_mod.check_config(nginx, prefix)
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
    server.pid, server.start_time = proc.pid, _proc_start_time(proc.pid)
    server.save()
    front = None
    try:
        if nginx:  # in TorchServe's process group: guard stop's signal to the group reaches it
            with open(prefix / "nginx.out", "w") as out:
                front = subprocess.Popen(ingress_mod.command(nginx, prefix), cwd=prefix, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         process_group=proc.pid)
            server.ingress_pid, server.ingress_start_time = front.pid, _proc_start_time(front.pid)
            server.save()
        wait_ready(server, proc, timeout=timeout, models=wait_for, ingress=front)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: Server, proc: subprocess.Popen | None = None, *, timeout: float = 240.0,
               models: list[str] | None = None, ingress: subprocess.Popen | None = None) -> None:
    """Poll (once a second, at most ``timeout`` s) until every model (or those in ``models``) has a READY
    worker; a guarded model among them refusing to load raises :class:`ProfileMismatch` at once."""
    deadline = time.monotonic() + timeout
    pending = list(server.models if models is None else models)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"TorchServe exited with code {proc.returncode} while starting; see "
                             f"{server.log}\n{server.log_tail()}")
        if ingress is not None and ingress.poll() is not None:
            raise ServeError(f"nginx exited with code {ingress.returncode} while starting; see "
                             f"{server.ingress_dir / 'error.log'}\n{server.log_tail()}")
        refused = next((r for m in pending if (r := server.refusal(m))), None)
        if refused:
            raise ProfileMismatch(f"TorchServe could not load a guarded model: {refused} (see {server.model_log})")
        if time.monotonic() > deadline:
            raise ServeError(f"TorchServe did not get {', '.join(pending)} ready within {timeout:.0f}s; "
                             f"see {server.log}\n{server.log_tail()}")
        if not server.token_auth or server.key_file.exists():
            try:
                pending = [m for m in pending if not server.model_ready(m)]
            except OSError:
                pass  # not listening yet
        if pending:
            time.sleep(1.0)


def guard_metric_lines(text: str) -> list[str]:
    """The sample lines of guard's metrics in a Prometheus text page (HELP/TYPE/buckets dropped)."""
    return [line for line in text.splitlines()
            if line.startswith("guard_") and "_bucket{" not in line]
