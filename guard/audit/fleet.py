"""Audit many models: one audit per model, run by an executor (Ray, or this process), one row per model.

A platform audits every version that lands in its registry, not one model. :func:`discover` reads a folder
with one subfolder per model (``model.py`` and ``weights.pt``), :func:`read_manifest` a JSON or YAML list of
models; :func:`run_fleet` sends each model's files (their bytes, so that a worker on another node needs no
shared file system) and the clean images to an executor (:mod:`guard.audit.executors`), takes the rows back
as they finish, writes each model's report into its own folder the moment its row arrives, and returns a
:class:`FleetResult` whose exit code is the worst row's.

Every model gets exactly one row: the driver keys rows by model name and keeps the first that arrives for
each (an executor that delivers a model twice, or a retried task that did finish once, cannot duplicate one),
and a model whose audit fails, for a bad file, a wrong shape or a lost worker, gets an error row with one
readable message while the others go on. The model's own code runs in the worker, as it runs in ``guard
audit``: audit untrusted models on workers isolated as that machine would be.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guard.audit.fleet_result import FleetResult
from guard.errors import GuardError, InputError

MODEL_FILE = "model.py"
WEIGHTS_FILE = "weights.pt"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
EXIT_ERROR = 2
"""A row's exit code when its model could not be audited (the CLI's code for bad input)."""
_COPY_PREFIX = "guard-fleet-"
"""A worker's copy of a model's files lives in ``TMPDIR/guard-fleet-PID-*`` while the model loads."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_orphaned_copies(root: str | Path | None = None) -> int:
    """Remove the model copies (:data:`_COPY_PREFIX`) whose worker process is gone, and return how many.

    A worker writes a model's code and weights into a temporary folder to load them and removes it after;
    a worker that the model's own code kills (``os._exit``, a segfault) or that the executor kills for a
    hang or a lost node cannot, and would leave an untrusted model's files behind. Every audit on a host
    and the driver at the end of a run sweep them (a folder whose process id is alive, possibly reused,
    waits for a later sweep)."""
    removed = 0
    for d in Path(root or tempfile.gettempdir()).glob(f"{_COPY_PREFIX}*-*"):
        pid = d.name[len(_COPY_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed += not d.exists()
    return removed


@dataclass(frozen=True)
class ModelEntry:
    """One model to audit: a name unique in the run (its report folder's name) and where its files are."""

    name: str
    model_file: Path | None
    weights: Path | None
    model_class: str | None = None
    normalize: str | None = None
    feature_layer: str | None = None
    uri: str | None = None
    """A registered version (``models:/NAME/VERSION`` or ``@ALIAS``) instead of the two files."""


@dataclass(frozen=True)
class AuditOptions:
    """What every model's audit runs with: the methods (``guard audit --methods``), the seed, and the torch
    threads each audit uses (its executor's CPUs per model)."""

    methods: tuple[str, ...]
    seed: int = 0
    threads: int = 1
    max_rounds: int | None = None
    """Neural Cleanse's budget (``guard audit --max-rounds``; None: its default)."""
    device: str = "cpu"
    """Where Neural Cleanse optimises (``cuda`` on a worker Ray gave a GPU)."""


@dataclass(frozen=True)
class Payload:
    """A model as a worker receives it: its files' contents, not their paths (no shared file system needed).
    ``problem`` is set instead when the driver could not read them; the worker then returns that error row."""

    name: str
    model_file_name: str = MODEL_FILE
    model_source: str = ""
    weights: bytes = b""
    model_class: str | None = None
    normalize: str | None = None
    feature_layer: str | None = None
    origin: str = ""
    """Where the model file was read from, for the messages of its error row."""
    problem: str | None = None
    registry: str | None = None
    """The registered version the files came from (``models:/NAME/VERSION``), whose tags get the verdict."""


def discover(models_dir: str | Path) -> list[ModelEntry]:
    """One entry per subfolder of ``models_dir`` (hidden ones skipped), sorted by name. A folder that lacks
    ``model.py`` or ``weights.pt`` is still an entry: its row says what is missing, and the others run.
    InputError when the folder does not exist or holds no subfolder."""
    root = Path(models_dir)
    if not root.is_dir():
        raise InputError(f"--models {root} is not a directory")
    entries = [ModelEntry(d.name, d / MODEL_FILE, d / WEIGHTS_FILE) for d in sorted(root.iterdir())
               if d.is_dir() and not d.name.startswith(".")]
    if not entries:
        raise InputError(f"--models {root} holds no model folders (one folder per model, each with "
                         f"{MODEL_FILE} and {WEIGHTS_FILE})")
    for e in entries:
        _check_name(e.name, str(root))
    return entries


def read_manifest(path: str | Path) -> list[ModelEntry]:
    """The models a JSON or YAML manifest lists: a list (or ``{"models": [...]}``) of objects with ``name`` and
    either ``model_file`` and ``weights`` (paths relative to the manifest's folder) or ``uri`` (a registered
    version, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``), and optionally ``model_class``, ``normalize``
    and ``feature_layer``. InputError, naming the entry, for anything else."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the manifest {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"the manifest {path} is not valid JSON or YAML: {str(e).splitlines()[0]}") from None
    items = doc.get("models") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise InputError(f"the manifest {path} must list models: a list, or {{\"models\": [...]}}")
    known = {"name", "model_file", "weights", "uri", "model_class", "normalize", "feature_layer"}
    entries, seen = [], set()
    for i, item in enumerate(items):
        where = f"the manifest {path}, entry {i + 1}"
        if not isinstance(item, dict):
            raise InputError(f"{where} is not an object with name, model_file and weights")
        wanted = ("name", "uri") if "uri" in item else ("name", "model_file", "weights")
        missing = [k for k in wanted if not isinstance(item.get(k), str) or not item[k]]
        if missing:
            raise InputError(f"{where} lacks {', '.join(missing)}")
        if "uri" in item and ("model_file" in item or "weights" in item):
            raise InputError(f"{where} names both a uri and files: give one")
        if "uri" in item and not item["uri"].startswith("models:/"):
            raise InputError(f"{where}: uri must be models:/NAME/VERSION or models:/NAME@ALIAS, got {item['uri']!r}")
        unknown = sorted(set(item) - known)
        if unknown:
            raise InputError(f"{where} has unknown keys {unknown} (known: {sorted(known)})")
        name = item["name"]
        _check_name(name, where)
        if name in seen:
            raise InputError(f"{where}: the name {name!r} is listed twice (each model's reports go to a folder "
                             "of its name)")
        seen.add(name)
        base = path.parent
        files = (None, None) if "uri" in item else (base / item["model_file"], base / item["weights"])
        entries.append(ModelEntry(name, *files, item.get("model_class"), item.get("normalize"),
                                  item.get("feature_layer"), item.get("uri")))
    return entries


def _check_name(name: str, where: str) -> None:
    if not _NAME.match(name):
        raise InputError(f"{where}: model name {name!r} must be 1-128 letters, digits, '.', '_' or '-' and "
                         "start with a letter or digit (it names the model's report folder)")


def payload(entry: ModelEntry, *, tracking_uri: str | None = None) -> Payload:
    """The entry's files read into a :class:`Payload` (a problem reading them goes into the payload's
    ``problem``, to become that model's error row). A registered version is fetched here, by the driver, from
    the registry at ``tracking_uri``; its workers need no access to the registry."""
    if entry.uri is not None:
        return _registered_payload(entry, tracking_uri)
    base = dict(name=entry.name, model_class=entry.model_class, normalize=entry.normalize,
                feature_layer=entry.feature_layer, origin=str(entry.model_file.parent))
    for what, p in (("model file", entry.model_file), ("weights", entry.weights)):
        if not p.is_file():
            return Payload(**base, problem=f"no {what} at {p}")
    try:
        source = entry.model_file.read_text(encoding="utf-8")
        weights = entry.weights.read_bytes()
    except (OSError, UnicodeDecodeError) as e:
        return Payload(**base, problem=f"cannot read the model's files: {e}")
    return Payload(**base, model_file_name=entry.model_file.name, model_source=source, weights=weights)


def _registered_payload(entry: ModelEntry, tracking_uri: str | None) -> Payload:
    from guard.registry.mlflow_registry import fetch

    base = dict(name=entry.name, model_class=entry.model_class, normalize=entry.normalize,
                feature_layer=entry.feature_layer, origin=entry.uri)
    try:
        version = fetch(entry.uri, tracking_uri=tracking_uri)
    except InputError as e:
        return Payload(**base, problem=str(e))
    try:
        return Payload(**base, model_source=version.model_file.read_text(encoding="utf-8"),
                       weights=version.weights.read_bytes(), registry=version.uri)
    finally:
        version.cleanup()


def audit_payload(p: Payload, x: np.ndarray | None, y: np.ndarray | None, options: AuditOptions) -> dict[str, Any]:
    """Audit one model in this process and return its row (runs on a worker).

    The row holds the model's ``summary`` (report.json's body), its ``html`` report and ``metrics`` text; or,
    when the model cannot be audited (its files, its code, its shape against the data), ``verdict`` "error"
    and one readable ``error`` line. Only a lost worker escapes as an exception (the executor retries it)."""
    import torch

    from guard._malloc import retain_freed_memory
    from guard.audit.report import render_html
    from guard.audit.rollout import metrics_text, neural_cleanse, run_audit
    from guard.model import load_model, validate_input_shape

    t0 = time.perf_counter()
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    if p.problem is not None:
        return {**error_row(p.name, p.problem, seconds=time.perf_counter() - t0, **where), "registry": p.registry}
    retain_freed_memory()  # as the CLI does: a worker scans as fast as `guard audit` (guard/_malloc.py)
    sweep_orphaned_copies()  # what workers on this host that died while loading a model left
    threads = torch.get_num_threads()  # the audit's own count, put back after: this may be the caller's process
    torch.set_num_threads(max(1, options.threads))
    tmp = ""
    try:
        with tempfile.TemporaryDirectory(prefix=f"{_COPY_PREFIX}{os.getpid()}-") as tmp:
            model_file, weights = Path(tmp) / p.model_file_name, Path(tmp) / WEIGHTS_FILE
            model_file.write_text(p.model_source, encoding="utf-8")
            weights.write_bytes(p.weights)
            model = load_model(model_file, weights, model_class_name=p.model_class, normalize=p.normalize)
        if x is not None:
            validate_input_shape(model, x.shape[1:])
        nc = neural_cleanse(seed=options.seed, device=options.device, max_rounds=options.max_rounds, progress=False)
        result = run_audit(model, x, y, methods=options.methods, seed=options.seed, layer=p.feature_layer, nc=nc,
                           source={"model_file": p.model_file_name, "weights": WEIGHTS_FILE, "name": p.name,
                                   "normalize": p.normalize, "model_class": p.model_class},
                           progress=False)
        html, metrics = render_html(result), metrics_text(result)
    except Exception as e:  # noqa: BLE001 - the model's own code failing is that model's row, not the run's end
        text = str(e) if isinstance(e, GuardError) else f"{type(e).__name__}: {e}"
        if tmp:  # name the folder the user gave, not the worker's copy
            text = text.replace(tmp, p.origin or p.name)
        return {**error_row(p.name, text.strip().splitlines()[0][:500] if text.strip() else type(e).__name__,
                            seconds=time.perf_counter() - t0, **where), "registry": p.registry}
    finally:
        torch.set_num_threads(threads)
    s = result.summary
    return {"name": p.name, "verdict": s["verdict"], "suspect_labels": list(s["suspect_labels"]),
            "exit_code": result.exit_code, "model_sha256": s["model_sha256"], "error": None,
            "seconds": round(time.perf_counter() - t0, 3), **where, "registry": p.registry, "summary": s,
            "html": html, "metrics": metrics}


def error_row(name: str, message: str, *, seconds: float = 0.0, host: str | None = None,
              pid: int | None = None) -> dict[str, Any]:
    """The row of a model that could not be audited."""
    return {"name": name, "verdict": "error", "suspect_labels": [], "exit_code": EXIT_ERROR, "model_sha256": None,
            "error": message, "seconds": round(seconds, 3), "host": host, "pid": pid, "registry": None}


def run_fleet(entries: list[ModelEntry], x: np.ndarray | None, y: np.ndarray | None, *, options: AuditOptions,
              executor, out: Path, progress: Callable[[dict[str, Any], FleetResult, int], None] | None = None,
              registry: dict[str, Any] | None = None) -> FleetResult:
    """Audit every entry with ``executor`` (:mod:`guard.audit.executors`), writing each model's reports into
    ``out/NAME/`` as its row arrives; ``progress(row, result_so_far, total)`` after each. Rows come back in
    the entries' order. ``registry`` (``tracking_uri``, ``alias``, ``experiment``) is where entries with a
    ``uri`` come from; each such model's verdict is written back to its version as its row arrives
    (:func:`guard.registry.mlflow_registry.record_verdict`; a failure to write it is the row's
    ``registry_error``)."""
    from guard.audit.fleet_report import write_model

    names = [e.name for e in entries]
    rows: dict[str, dict[str, Any]] = {}
    state = FleetResult([], executor=executor.describe())
    registry = registry or {}
    tracking_uri = registry.get("tracking_uri")
    for row in executor.run((payload(e, tracking_uri=tracking_uri) for e in entries), x, y, options):
        name = row.get("name")
        if name not in names or name in rows:  # a second delivery of a model: its first row stands
            state.duplicates_dropped += 1
            continue
        row["report"] = write_model(row, out)
        row["registry_error"] = (_write_back(row, out / name, registry)
                                 if row.get("registry") and row["verdict"] != "error" else None)
        rows[name] = _public(row)
        state.rows = list(rows.values())
        if progress is not None:
            progress(rows[name], state, len(entries))
    for name in names:  # an executor that lost a model without a row: say so rather than drop it
        if name not in rows:
            row = error_row(name, "the executor returned no result for this model")
            row["report"], row["registry_error"] = write_model(row, out), None
            rows[name] = _public(row)
    sweep_orphaned_copies()  # a local executor's workers share this host's temporary folder
    return FleetResult([rows[n] for n in names], executor=state.executor, seconds=state.elapsed(),
                       duplicates_dropped=state.duplicates_dropped, started=state.started)


def _write_back(row: dict[str, Any], report_dir: Path, registry: dict[str, Any]) -> str | None:
    """Tag the row's registered version with its verdict (None when written, else why not)."""
    from guard.registry.mlflow_registry import RegisteredVersion, record_verdict

    name, version = row["registry"][len("models:/"):].rsplit("/", 1)
    v = RegisteredVersion(name, version, Path(), Path(), "", report_dir)
    try:
        record_verdict(v, row["summary"], report_dir, alias=registry.get("alias"),
                       experiment=registry.get("experiment", "guard-audit"), tracking_uri=registry.get("tracking_uri"))
    except InputError as e:
        return str(e)
    return None


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the report bodies (they are in the model's folder)."""
    return {k: v for k, v in row.items() if k not in ("summary", "html", "metrics")}


def entries_of(models: str | None, manifest: str | None) -> list[ModelEntry]:
    """The CLI's ``--models DIR`` or ``--manifest FILE`` as entries (exactly one of them)."""
    if (models is None) == (manifest is None):
        raise InputError("give exactly one of --models DIR and --manifest FILE")
    return discover(models) if models is not None else read_manifest(manifest)


def iterate(payloads: Iterable[Payload], x, y, options: AuditOptions) -> Iterator[dict[str, Any]]:
    """Each payload's row in turn, audited in this process (the local executor's loop)."""
    for p in payloads:
        yield audit_payload(p, x, y, options)
