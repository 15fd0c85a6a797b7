"""A run's performance figures: the guard's overhead over the bare forward, batched Neural Cleanse,
scan seconds, TorchServe throughput guarded over stock, and the same on the ResNet-18 layout."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from guard.bench.config import BenchConfig, bench_data, log, on_net, profile_dir
from guard.bench.models import zoo_model
from guard.online import Guard
from guard.scan import build_profile
from guard.scan.neural_cleanse import NeuralCleanse


def performance(cfg: BenchConfig, ctx: dict[str, Any] | None, results: dict[str, Any], xc: np.ndarray,
                 x_fit: np.ndarray, neg: np.ndarray, k: int, progress, *, cache: Path | None = None,
                 profiles: Path | None = None) -> dict[str, Any]:
    from guard.bench.nc_speed import nc_speedup, scan_seconds_by_classes
    from guard.bench.overhead import measure_overhead, overhead_breakdown

    perf: dict[str, Any] = {"model": None, "guard_overhead_p50_ratio": None, "guard_overhead_p95_ratio": None,
                            "nc_batched_speedup": None, "scan_seconds": None, "torchserve_throughput_ratio": None,
                            "ingress_throughput_ratio": None}
    scans = [r["scan_seconds"] for r in results["attacks"]]
    # the profile scan (Neural Cleanse + suspect neurons + fitting and calibrating the checks), median
    # over the attacks' models; the other offline methods' times next to it
    perf["scan_seconds"] = round(float(np.median(scans)), 2) if scans else None
    perf["scan"] = {"profile_median": perf["scan_seconds"],
                    "per_attack": {(r["name"] if r["net"] == "demo_net" else f"{r['name']} ({r['net']})"):
                                   r["scan_seconds"] for r in results["attacks"]},
                    "dl_tnd_median": median_of(results, "dl_tnd"), "df_tnd_median": median_of(results, "df_tnd")}
    if cfg.scaling and cache is not None:
        log(progress, "performance: Neural Cleanse at 10, 100 and 1000 classes (composed glyphs)")
        perf["scan_scaling"] = scan_seconds_by_classes(cache / "scaling", seed=cfg.zoo.seed)
        perf["scan_seconds_by_classes"] = perf["scan_scaling"]["scan_seconds_by_classes"]
    if cfg.size_scaling and cache is not None:
        from guard.bench.input_sizes import scan_seconds_by_size

        log(progress, "performance: guard scan at 32x32, 64x64 and 224x224 (torchvision's ResNet-18 layout)")
        perf["size_scaling"] = scan_seconds_by_size(cache / "sizes", seed=cfg.zoo.seed)
        perf["scan_seconds_by_size"] = perf["size_scaling"]["scan_seconds_by_size"]
    if cfg.resnet18_performance and cache is not None and profiles is not None:
        log(progress, "performance: the guard on a BadNets ResNet-18 layout model")
        perf["resnet18"] = resnet18_performance(cfg, neg, cache, profiles)
    if ctx is None:
        return perf
    model, profile = ctx["model"], ctx["profile"]
    perf["model"] = ctx["name"]
    perf["net"] = ctx["net"]
    guard = Guard(model, profile, mode="enforce", verify=False)
    log(progress, "performance: guard overhead (batch 1, 32)")
    over = {}
    for b in (1, 32):
        over[f"batch_{b}"] = measure_overhead(model, guard, neg, batch_size=b, repeats=cfg.overhead_repeats)
    perf["overhead"] = over
    perf["overhead_breakdown_batch_1_us"] = overhead_breakdown(guard, neg, repeats=cfg.overhead_repeats)
    log(progress, "performance: a served request's stages, guarded and baseline")
    from guard.bench.breakdown import serving_breakdown

    perf["serving_breakdown_us"] = serving_breakdown(guard, neg, ctx.get("triggered"), repeats=cfg.overhead_repeats)
    if cfg.flip_check:
        from guard.bench.mirror import flip_cost

        perf["flip_check_cost_batch_1"] = flip_cost(model, neg, repeats=cfg.overhead_repeats)
    perf["guard_overhead_p50_ratio"] = {b: round(v["p50_ratio"], 3) for b, v in over.items()}
    perf["guard_overhead_p95_ratio"] = {b: round(v["p95_ratio"], 3) for b, v in over.items()}
    perf["checks"] = list(guard.names)
    log(progress, f"performance: batched Neural Cleanse vs per-label loop ({cfg.nc_speed_rounds} rounds)")
    nc = nc_speedup(model, x_fit, num_classes=k, rounds=cfg.nc_speed_rounds, seed=cfg.zoo.seed, target=ctx["target"])
    perf["nc_batched_speedup"] = nc["nc_batched_speedup"]
    perf["nc_batched"] = nc
    if not cfg.torchserve:
        perf["torchserve"] = {"skipped": "TorchServe throughput not measured in this configuration"}
        return perf
    log(progress, "performance: TorchServe throughput, guarded vs baseline handler")
    perf["torchserve"] = torchserve_figures(on_net(cfg, ctx["net"]), model, profile, neg)
    perf["torchserve_throughput_ratio"] = perf["torchserve"].get("torchserve_throughput_ratio")
    perf["ingress_throughput_ratio"] = perf["torchserve"].get("ingress_throughput_ratio")
    return perf


def resnet18_performance(cfg: BenchConfig, neg: np.ndarray, cache: Path, profiles: Path) -> dict[str, Any]:
    """Overhead (batch 1 and 32) and TorchServe throughput on the zoo's BadNets ResNet-18 layout model, with
    the profile this run wrote for it (the full preset) or a default scan of it (the others)."""
    from guard.bench.overhead import net_performance
    from guard.demo.attacks.zoo import model_file
    from guard.model import fingerprint
    from guard.profile import Profile

    d, xc, yc = bench_data(cfg)
    zm = zoo_model("badnets", replace(cfg.zoo, net="resnet18"), data=d, cache=cache)
    path = profile_dir(profiles, "resnet18", "badnets")
    if (path / "profile.json").is_file():
        profile = Profile.load(path, model_sha256=fingerprint(zm.model))
    else:
        nc = NeuralCleanse(seed=cfg.zoo.seed, max_rounds=cfg.nc_max_rounds, progress=False)
        profile, _ = build_profile(zm.model, xc, yc, fpr=cfg.fpr, seed=cfg.zoo.seed, nc=nc, progress=False,
                                   knn=cfg.knn)
    ts = None
    if cfg.torchserve and (shutil.which("java") is not None or os.environ.get("JAVA_HOME")):
        ts = {"requests": cfg.ts_requests, "rounds": cfg.ts_rounds, "concurrency": cfg.ts_concurrency,
              "threads": torch.get_num_threads(), "grid_clients": cfg.ts_grid_clients,
              "grid_batch_sizes": cfg.ts_grid_batch_sizes}
    out = net_performance(zm.model, profile, neg, model_file("resnet18"), repeats=cfg.overhead_repeats,
                          torchserve=ts)
    if cfg.torchserve and ts is None:
        out["torchserve"] = {"error": "java not found: TorchServe needs Java 17"}
    return {"model": "badnets", "net": "resnet18", "clean_accuracy": round(zm.clean_accuracy, 4),
            "attack_success_rate": zm.attack_success_rate, "suspect_labels": profile.suspect_labels} | out


def median_of(results: dict[str, Any], method: str) -> float | None:
    v = [r["detected"][method]["seconds"] for r in results["attacks"] if r["detected"].get(method)]
    return round(float(np.median(v)), 2) if v else None


def torchserve_figures(cfg: BenchConfig, model: nn.Module, profile, x: np.ndarray) -> dict[str, Any]:
    """Write the model as a user would (model file, state_dict, profile) and measure both handlers."""
    from guard.bench.serving import torchserve_throughput
    from guard.demo.attacks.zoo import model_file
    from guard.errors import GuardError
    from guard.torchserve.client import ServeError

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return {"error": "java not found: TorchServe needs Java 17"}
    work = Path(tempfile.mkdtemp(prefix="guard-bench-"))
    try:
        (work / "model.py").write_text(model_file(cfg.zoo.net))
        torch.save(model.state_dict(), work / "weights.pt")
        prof_dir = profile.save(work / "profile")
        return torchserve_throughput(work / "model.py", work / "weights.pt", prof_dir, x, requests=cfg.ts_requests,
                                     rounds=cfg.ts_rounds, concurrency=cfg.ts_concurrency, work_dir=work / "ts",
                                     threads=torch.get_num_threads(), grid_clients=cfg.ts_grid_clients,
                                     grid_batch_sizes=cfg.ts_grid_batch_sizes)
    except (GuardError, ServeError, OSError) as e:
        return {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
