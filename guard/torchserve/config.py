"""The effective ``config.properties`` of a run: deploy's keys, absolute paths, loopback addresses, free
ports, and a frontend request bound above every served archive's."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from guard._assets import deploy_file
from guard.errors import InputError
from guard.serving import DEFAULT_MAX_REQUEST_BYTES as HANDLER_DEFAULT_MAX_REQUEST_BYTES
from guard.serving.service import TORCHSERVE_MAX_REQUEST_SIZE, handler_section
from guard.torchserve.ports import free_ports, worker_port

DEPLOY = deploy_file("config.properties").parent  # the installed serving configs (guard/_assets)




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


def archive_max_request_bytes(mar: Path) -> int:
    """The ``handler.max_request_bytes`` an archive's model-config.yaml sets (the handler default if none)."""
    import yaml

    try:
        with zipfile.ZipFile(mar) as z:
            cfg = yaml.safe_load(z.read("model-config.yaml")) or {}
        return int(handler_section(cfg).get("max_request_bytes", HANDLER_DEFAULT_MAX_REQUEST_BYTES))
    except (OSError, KeyError, ValueError, TypeError, AttributeError, zipfile.BadZipFile, yaml.YAMLError):
        return HANDLER_DEFAULT_MAX_REQUEST_BYTES


def frontend_max_request_size(handler_bounds: list[int], configured: int | None = None) -> int:
    """TorchServe's ``max_request_size`` for handlers bounded at ``handler_bounds`` bytes.

    Twice the largest bound (so over-bound bodies up to that size reach the handler, which answers a JSON
    413), never below TorchServe's default nor below an explicitly ``configured`` larger value.
    """
    return max(2 * max(handler_bounds or [HANDLER_DEFAULT_MAX_REQUEST_BYTES]), TORCHSERVE_MAX_REQUEST_SIZE,
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
        "initial_worker_port": str(worker_port()),
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
