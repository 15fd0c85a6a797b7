"""A started TorchServe as a :class:`Server`: its process group (TorchServe, its workers, nginx), state file,
keys and logs; readiness, refusals, and a stop that always reaps what it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guard.errors import ProfileMismatch
from guard.serving import REFUSAL_MARK
from guard.torchserve.client import ServeError, http

STATE_NAME = "serve.json"


def proc_start_time(pid: int) -> str | None:
    """Start time of ``pid`` from /proc (guards ``guard stop`` against a recycled pid), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
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
        st = proc_start_time(self.ingress_pid)
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
        if not group_alive(self.pid):
            return False
        st = proc_start_time(self.pid)
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
            while group_alive(self.pid) and time.monotonic() < deadline:
                self._reap_children()
                time.sleep(0.2)
            if group_alive(self.pid):
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while group_alive(self.pid) and time.monotonic() < deadline:
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
