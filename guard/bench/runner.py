"""``guard bench``: the attack zoo against the offline scans, the online guard, repair and STRIP.

For every attack of the zoo (and a clean model, the negative class of the offline scans) one small
seeded DemoNet is trained on the glyph world (:mod:`guard.bench.models`, cached), then:

* **offline**: the profile is built (:func:`guard.scan.build_profile`: Neural Cleanse, suspect
  neurons, every online check fitted and calibrated at ``fpr``) and DL-TND / DF-TND run on it; each
  says whether it flags the attack's target (for all-to-all, any label);
* **online**: the guard scores ``n_eval`` clean test images and ``n_eval`` triggered test images of
  other classes than the target (:mod:`guard.bench.evaluation`: AUROC and TPR at 1% FPR per check and
  for the combined verdict, plus the deployed verdict's realised TPR/FPR);
* **repair**: the guard in ``repair`` mode on the same inputs: attack success (the attacker's label
  served) and clean accuracy (a rejected clean input counts as wrong) after repair;
* **STRIP** (:mod:`guard.bench.strip`) and, where installed, ART's STRIP, on the same inputs.

Then the performance figures on the BadNets model: the guard's overhead over the bare forward
(:func:`guard.bench.overhead.measure_overhead`, batch 1 and 32), batched Neural Cleanse over the
per-label loop (:mod:`guard.bench.nc_speed`), scan seconds, and TorchServe throughput guarded over the
baseline handler (:mod:`guard.bench.serving`). :func:`run_bench` returns the JSON-ready results;
:mod:`guard.bench.report` renders the Markdown table and the target checklist.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from guard.bench.config import SCHEMA_VERSION, BenchConfig, bench_data, log, on_net, profile_dir
from guard.bench.machine import choose_threads, cpu_seconds, machine_facts
from guard.bench.models import zoo_model
from guard.bench.performance import performance
from guard.bench.provenance import code_facts, describe
from guard.bench.provenance import require_clean as require_clean_tree
from guard.bench.report import targets
from guard.bench.rows import attack_row, clean_row
from guard.bench.strip import art_available
from guard.data import split
from guard.model import num_classes


def _print_progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def run_bench(cfg: BenchConfig, *, out_dir: Path, cache: Path | None = None, threads: int | None = None,
              progress: Callable[[str], None] | None = None, command: str = "",
              jobs: int | None = None, require_clean: bool = False) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; returns the results (also the caller's to write).

    ``jobs`` worker processes (single-threaded) run the attacks side by side; by default two on an
    idle machine with two or more cores, else one (in this process). The performance figures are
    measured afterwards, in this process, with no job running. The results name the commit measured and
    whether the package had uncommitted changes (:mod:`guard.bench.provenance`); ``require_clean`` refuses
    (InputError) to start on such a tree.
    """
    code = code_facts()
    if require_clean:
        require_clean_tree(code)
    if code["dirty"]:
        log(progress, f"warning: measuring uncommitted code ({describe(code)}): "
                      "these figures belong to no commit")
    previous_threads = torch.get_num_threads()
    threads, threads_reason = choose_threads(threads)
    if jobs is None:
        jobs = 2 if threads > 1 else 1
    torch.set_num_threads(threads)
    try:
        return _run(cfg, out_dir=out_dir, cache=cache, threads_reason=threads_reason, progress=progress,
                    command=command, jobs=max(1, int(jobs)), code=code)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: BenchConfig, *, out_dir: Path, cache: Path | None, threads_reason: str,
         progress: Callable[[str], None] | None, command: str, jobs: int, code: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache or out_dir / "models"
    profiles = out_dir / "profiles"
    art_ok, art_reason = art_available() if cfg.art else (False, "ART STRIP turned off (--no-art)")
    d, xc, yc = bench_data(cfg)
    x_fit, y_fit, _, _ = split(xc, yc, 0.5, seed=cfg.zoo.seed)  # build_profile's own split
    neg = d.x_test[:min(cfg.n_eval, len(d.x_test))]

    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_facts() | {"threads_reason": threads_reason, "jobs": jobs}, "config": cfg.to_json(),
        "code": code,
        "art_strip_available": art_ok, "art_strip_reason": None if art_ok else art_reason,
        "clean_models": [], "attacks": [],
    }
    cleans = {}
    for net in cfg.nets:
        log(progress, f"training the clean {net} ({cfg.zoo.n_train} images, {cfg.zoo.epochs} epochs)")
        cleans[net] = zoo_model("clean", on_net(cfg, net).zoo, data=d, cache=cache)  # cached: the jobs reuse it
    clean = cleans[cfg.nets[0]]
    k = num_classes(clean.model, xc)
    todo = [(on_net(cfg, net), name, cache, profiles, art_ok, progress is not None)
            for net in cfg.nets for name in cfg.attacks]
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        log(progress, f"{len(todo)} attacks in {jobs} worker processes (1 thread each)")
        from guard._malloc import retain_freed_memory

        pool = mp.get_context("spawn").Pool(jobs, initializer=retain_freed_memory)
        try:
            pending = pool.map_async(_job, todo, chunksize=1)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # beside the jobs: no spinning second thread
            try:
                for net in cfg.nets:
                    clean_row(on_net(cfg, net), cleans[net], xc, yc, x_fit, y_fit, k, results, progress)
            finally:
                torch.set_num_threads(threads)
            rows = pending.get()
        finally:
            pool.terminate()
            pool.join()
    else:
        for net in cfg.nets:
            clean_row(on_net(cfg, net), cleans[net], xc, yc, x_fit, y_fit, k, results, progress)
        rows = [_saved_row(*t[:5], progress) for t in todo]
    for row, art_error in rows:
        results["attacks"].append(row)
        if art_error:
            results["art_strip_reason"] = art_error
    ctx = None
    first = [r for r in results["attacks"] if r["net"] == cfg.nets[0]]  # performance: on the first network
    names = [r["name"] for r in first]
    if names:
        name = "badnets" if "badnets" in names else names[0]
        from guard.model import fingerprint
        from guard.profile import Profile

        zm = zoo_model(name, on_net(cfg, cfg.nets[0]).zoo, data=d, cache=cache, clean_model=clean.model)
        row = first[names.index(name)]
        ctx = {"name": name, "net": cfg.nets[0], "model": zm.model, "target": row["target"],
               "triggered": None if zm.attack is None else zm.attack.stamp(neg[:8]),
               "profile": Profile.load(profile_dir(profiles, cfg.nets[0], name), model_sha256=fingerprint(zm.model))}
    results["performance"] = performance(cfg, ctx, results, xc, x_fit, neg, k, progress, cache=cache,
                                          profiles=profiles)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"]["load_average_1m_at_end"] = round(load[0], 2) if load else None
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["cpu_seconds"] = cpu_seconds()
    results["targets"] = [{"scope": sc, "target": bar, "measured": meas, "met": met}
                          for sc, bar, meas, met in targets(results)]
    return results


def _job(args: tuple) -> tuple[dict[str, Any], str | None]:
    """One attack in a worker process: single-threaded torch and BLAS, so two jobs share two cores."""
    cfg, name, cache, profiles, art_ok, show = args
    torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _saved_row(cfg, name, cache, profiles, art_ok, _print_progress if show else None)


#: the packages whose code produces an attack row: a change to any of them recomputes saved rows
_ROW_CODE = ("guard/bench", "guard/online", "guard/scan", "guard/purify", "guard/demo", "guard/model",
             "guard/profile.py", "guard/stats.py", "guard/data.py")


def _row_key(cfg: BenchConfig, name: str) -> str:
    """A digest of the configuration, the attack and the source of every module that measures a row
    (the report's rendering left out, and the purification code when the run has no purification rows)."""
    import hashlib

    root = Path(__file__).resolve().parents[2]
    skip = {"guard/bench/report.py"}
    h = hashlib.sha256(json.dumps([cfg.to_json(), name], sort_keys=True).encode())
    for part in _ROW_CODE:
        if part == "guard/purify" and not cfg.purify_per_class:
            continue
        path = root / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            rel = f.relative_to(root).as_posix()
            if rel in skip or (rel == "guard/bench/purification.py" and not cfg.purify_per_class):
                continue
            h.update(rel.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _saved_row(cfg: BenchConfig, name: str, cache: Path, profiles: Path, art_ok: bool,
               progress: Callable[[str], None] | None) -> tuple[dict[str, Any], str | None]:
    """:func:`attack_row`, saved as ``OUT/rows/NET-NAME-KEY.json`` when done and reused by a rerun with
    the same configuration and code (``KEY``, :func:`_row_key`): a long run that stops part-way (a
    machine taken back, a session over) resumes at the rows it had not finished. The row's profile is
    under ``profiles/`` beside it."""
    path = profiles.parent / "rows" / f"{cfg.zoo.net}-{name}-{_row_key(cfg, name)}.json"
    if path.exists():
        log(progress, f"{name} ({cfg.zoo.net}): finished in an earlier run ({path.name})")
        saved = json.loads(path.read_text())
        return saved["row"] | {"resumed": True}, saved["art_error"]
    row, art_error = attack_row(cfg, name, cache, profiles, art_ok, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"row": row, "art_error": art_error}))
    tmp.replace(path)
    return row, art_error
