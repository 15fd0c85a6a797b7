"""nginx in front of TorchServe for ``guard serve --ingress nginx``: render its config, check it, start it.

TorchServe 0.12's frontend answers some client input outside the endpoint's HTTP contract: a 500 to a form
body whose percent escapes do not decode, an empty 413 (sometimes a reset) above ``max_request_size``, and
400 ``InvalidKeyException`` where clients expect 401. nginx, configured from ``deploy/nginx/`` (installed as
package data, :mod:`guard._assets`), is the ingress that answers those itself:

* bodies over the bound get a JSON 413 naming it; the bound is TorchServe's ``max_request_size``, which
  ``guard serve`` sets to twice the handlers' ``max_request_bytes``, so a body between the two still reaches
  the handler's own JSON 413 (and its counters);
* the inference API forwards JSON, PNG and JPEG with their media type and every other body as
  ``application/octet-stream`` (TorchServe's form decoders never see a body; the handler sniffs it);
* authentication happens at the ingress: ``guard serve`` makes an inference and a management key
  (:func:`make_keys`), writes them to the run directory's ``key_file.json`` (mode 0600, TorchServe's key file
  layout) and renders them into nginx's config (``guard.conf``, mode 0600); nginx answers a missing or wrong
  token with a JSON 401 and ``WWW-Authenticate: Bearer``, strips the header, and forwards to TorchServe, which
  runs with its own token authorization off on private 127.0.0.1 ports that only the ingress (and local
  processes of this host) can reach. The keys do not expire; a new ``guard serve`` makes new ones;
* a TorchServe that does not answer gets a JSON 502/504; every answer carries ``X-Request-Id`` (TorchServe's
  own id, the audit log's key, when TorchServe answered) and is logged as one JSON line in
  ``RUN_DIR/nginx/access.json.log``.

nginx runs in TorchServe's process group (``guard stop`` signals the group), with ``-p RUN_DIR/nginx`` and
``daemon off``; its workers write no files (bodies are held in memory up to the bound).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

from guard._assets import deploy_file
from guard.errors import InputError

INGRESSES = ("none", "nginx")
NGINX_TEMPLATE = "nginx/guard.conf.template"
NGINX_MAIN = "nginx/nginx.conf"
UPSTREAM_TIMEOUT_S = 130  # above TorchServe's default_response_timeout (120 s)
KEEPALIVE = 64  # idle keep-alive connections to TorchServe per nginx worker
INSTALL_HINT = "nginx is not on PATH: install it (apt-get install nginx) or serve without it (--ingress none)"
_PLACEHOLDER = re.compile(r"\$\{(GUARD_[A-Z_]+)\}")
_KEY = re.compile(r"[A-Za-z0-9_\-]{16,256}")
_SAFE_HINT = re.compile(r"[A-Za-z0-9_\-./ ]*")


class IngressError(InputError):
    """nginx is missing or its config does not load."""


def require_nginx() -> str:
    """Path of ``nginx`` on PATH, or one line saying how to install it (exit status 2 from the CLI)."""
    found = shutil.which("nginx")
    if not found:
        raise IngressError(INSTALL_HINT)
    return found


def make_keys(key_file: Path) -> dict[str, dict[str, str]]:
    """New inference and management keys, written to ``key_file`` (mode 0600) in TorchServe's layout."""
    keys = {kind: {"key": secrets.token_urlsafe(24)} for kind in ("inference", "management")}
    key_file.unlink(missing_ok=True)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh, indent=2)
        fh.write("\n")
    return keys


def render(text: str, values: dict[str, str]) -> str:
    """``${GUARD_NAME}`` placeholders replaced (nginx's own ``$variables`` untouched); an unknown one raises."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise ValueError(f"no value for {', '.join(missing)} in the nginx template")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def template_values(*, host: str, ports: tuple[int, int, int], upstream: tuple[int, int, int], max_body: int,
                    keys: dict[str, str] | None, key_hint: str, log_dir: Path,
                    workers: str | None = None) -> dict[str, str]:
    """The ``GUARD_*`` values of ``deploy/nginx/guard.conf.template`` for ``guard serve``."""
    for kind, key in (keys or {}).items():
        if not _KEY.fullmatch(key or ""):
            raise IngressError(f"the {kind} key has characters nginx's config cannot carry")
    hint = key_hint if _SAFE_HINT.fullmatch(key_hint) else "keys in the run directory's key_file.json"
    listen = f"[{host}]" if ":" in host else host
    return {
        "GUARD_LISTEN": listen,
        "GUARD_INFERENCE_PORT": str(ports[0]), "GUARD_MANAGEMENT_PORT": str(ports[1]),
        "GUARD_METRICS_PORT": str(ports[2]),
        "GUARD_UPSTREAM_INFERENCE": f"127.0.0.1:{upstream[0]}",
        "GUARD_UPSTREAM_MANAGEMENT": f"127.0.0.1:{upstream[1]}",
        "GUARD_UPSTREAM_METRICS": f"127.0.0.1:{upstream[2]}",
        "GUARD_MAX_BODY": str(int(max_body)),
        "GUARD_INFERENCE_KEY": (keys or {}).get("inference") or "-",
        "GUARD_MANAGEMENT_KEY": (keys or {}).get("management") or "-",
        "GUARD_AUTH_REQUIRED": "1" if keys else "0",
        "GUARD_KEY_HINT": hint,
        "GUARD_LOG_DIR": str(log_dir),
        "GUARD_UPSTREAM_TIMEOUT": str(UPSTREAM_TIMEOUT_S),
        "GUARD_KEEPALIVE": str(KEEPALIVE),
        "GUARD_NGINX_WORKERS": workers or os.environ.get("GUARD_NGINX_WORKERS", "auto"),
    }


def write_config(prefix: Path, values: dict[str, str]) -> Path:
    """Render ``nginx.conf`` and ``guard.conf`` (the latter holds the keys: mode 0600) into ``prefix``."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    guard_conf = prefix / "guard.conf"
    guard_conf.unlink(missing_ok=True)
    fd = os.open(guard_conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(render(deploy_file(NGINX_TEMPLATE).read_text(), values))
    main = prefix / "nginx.conf"
    main.write_text(render(deploy_file(NGINX_MAIN).read_text(), values))
    return main


def command(nginx: str, prefix: Path) -> list[str]:
    """nginx in the foreground with the rendered config; its early errors go to ``prefix/error.log``."""
    return [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"),
            "-g", "daemon off;"]


def validate_nginx_config(nginx: str, prefix: Path) -> None:
    """``nginx -t`` on the rendered config: a clear error before anything starts."""
    cmd = command(nginx, prefix)
    done = subprocess.run([*cmd[:-2], "-t", "-q"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise IngressError(f"nginx refused the rendered config {prefix / 'nginx.conf'}: "
                           f"{(done.stderr or done.stdout).strip()[-1000:]}")


__all__ = ["INGRESSES", "IngressError", "validate_nginx_config", "command", "make_keys", "render", "require_nginx",
           "template_values", "write_config"]
