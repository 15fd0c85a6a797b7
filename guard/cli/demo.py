"""The whole story in a few minutes, from a clean checkout: train a backdoored demo model (BadNets
3x3 patch -> label 6 on the glyph task), scan it, archive it with its profile, serve it with
TorchServe on free loopback ports (token auth on), send clean and triggered queries (JSON and PNG),
print the verdicts per kind and guard's metric lines from the metrics port, then stop TorchServe
(always, unless --keep-running)."""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from guard.modes import MODES

HELP = "end-to-end demo: build, scan, archive, serve, query, show metrics"
MODEL_NAME = "demo"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="working directory (default ./demo-out)")
    p.add_argument("--mode", choices=MODES, default="enforce",
                   help="policy to serve (default enforce)")
    p.add_argument("--queries", type=int, default=24, help="clean and triggered images to send each (default 24)")
    p.add_argument("--keep-running", action="store_true", help="leave TorchServe running afterwards")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the demo model and its scan (default: the demo's own, see guard.demo.world)")


def _say(text: str) -> None:
    print(text, flush=True)


def png_bytes(image: np.ndarray) -> bytes:
    """A ``(C, H, W)`` image in [0, 1] as PNG bytes (what a client would upload)."""
    from PIL import Image

    arr = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _query(server, kind: str, x: np.ndarray, y: np.ndarray, *, batch: int) -> list[dict]:
    """Send ``x`` as JSON requests of ``batch`` instances; one row per instance with status and verdict."""
    from guard.torchserve.client import http

    url = f"{server.urls['inference']}/predictions/{MODEL_NAME}"
    rows = []
    for i in range(0, len(x), batch):
        body = json.dumps({"instances": x[i:i + batch].tolist()}).encode()
        status, text = http(url, key=server.key(), body=body, content_type="application/json", timeout=60)
        preds = json.loads(text).get("predictions", []) if status in (200, 403) else []
        for j, p in enumerate(preds):
            rows.append({"kind": kind, "status": status, "verdict": p["verdict"], "label": p["label"],
                         "true": int(y[i + j]), "reasons": p["reasons"]})
    return rows


def _table(rows: list[dict], target: int | None) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    head = f"{'kind':<22}{'n':>4}{'pass':>6}{'repaired':>10}{'rejected':>10}{'flagged':>9}  hijacked  correct"
    lines = [head, "-" * len(head)]
    for k in kinds:
        rs = [r for r in rows if r["kind"] == k]
        c = Counter(r["verdict"] for r in rs)
        answered = [r for r in rs if r["label"] is not None]
        hijacked = sum(r["label"] == target != r["true"] for r in answered) if target is not None else 0
        correct = sum(r["label"] == r["true"] for r in answered)
        lines.append(f"{k:<22}{len(rs):>4}{c['pass']:>6}{c['repaired']:>10}{c['rejected']:>10}{c['flagged']:>9}"
                     f"  {hijacked:>8}  {correct:>7}")
    lines.append(f"(hijacked: answered with the backdoor's target {target} although the image is another class; "
                 "correct: answered with the true class)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from guard.cli.serve import describe
    from guard.data import load_npz
    from guard.demo.world import build
    from guard.model import load_model
    from guard.scan import build_profile
    from guard.torchserve import server as ts
    from guard.torchserve.archive import make_archive
    from guard.torchserve.client import http

    ts.require_java()
    ts.require_script("torchserve")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    _say(f"[1/5] building the demo world in {out}/world (BadNets 3x3 patch -> label 6) ...")
    world = build(out / "world") if args.seed is None else build(out / "world", seed=args.seed)
    target = world.attack.target if world.attack is not None else None
    _say(f"      clean accuracy {world.clean_accuracy:.3f}, attack success {world.attack_success:.3f} "
         f"({time.perf_counter() - t0:.0f}s)")

    _say("[2/5] scanning with Neural Cleanse and calibrating the online checks ...")
    model = load_model(world.model_file, world.weights)
    x, y = load_npz(world.clean)
    profile, summary = build_profile(model, x, y, fpr=0.01, seed=args.seed or 0, mode=args.mode, progress=False)
    profile_dir = profile.save(out / "profile")
    sus = summary["suspect_labels"]
    _say(f"      suspect labels: {sus if sus else 'none'} (anomaly index of label {target}: "
         f"{summary['anomaly_index'].get(str(target), float('nan')):.2f}, log-scale "
         f"{summary['log_anomaly_index'].get(str(target), float('nan')):.2f}); checks "
         f"{', '.join(summary['thresholds'])}; profile {profile_dir} ({time.perf_counter() - t0:.0f}s)")

    _say(f"[3/5] archiving {MODEL_NAME}.mar (mode {args.mode}) ...")
    store = out / "model-store"
    mar, _ = make_archive(name=MODEL_NAME, model_file=world.model_file, weights=world.weights,
                          profile=profile_dir, export_path=store, mode=args.mode, force=True)
    _say(f"      {mar}")

    _say("[4/5] starting TorchServe on free loopback ports (token auth on) ...")
    server = ts.start(store, models={MODEL_NAME: mar.name}, run_dir=out / "serve", timeout=300)
    try:
        _say("      " + describe(server).replace("\n", "\n      "))
        _say(f"[5/5] querying ({args.queries} clean and {args.queries} triggered held-out images) ...")
        url = f"{server.urls['inference']}/predictions/{MODEL_NAME}"
        status, _ = http(url, body=b'{"instances": []}', content_type="application/json")
        _say(f"      without the token the endpoint answers {status} (InvalidKeyException)")
        xh, yh = load_npz(world.holdout)
        xt, yt = load_npz(world.triggered)
        n = max(1, min(args.queries, len(xh), len(xt)))
        rows = _query(server, "clean (JSON x8)", xh[:n], yh[:n], batch=8)
        rows += _query(server, "triggered (JSON x8)", xt[:n], yt[:n], batch=8)
        single = _query(server, "triggered (JSON x1)", xt[n:n + 4], yt[n:n + 4], batch=1)
        rows += single
        for kind, img, lab in (("clean (PNG)", xh[n], yh[n]), ("triggered (PNG)", xt[n + 4], yt[n + 4])):
            status, text = http(url, key=server.key(), body=png_bytes(img), content_type="image/png", timeout=60)
            for p in json.loads(text).get("predictions", []):
                rows.append({"kind": kind, "status": status, "verdict": p["verdict"], "label": p["label"],
                             "true": int(lab), "reasons": p["reasons"]})
        status, text = http(url, key=server.key(), body=b'{"instances": [[0.5, 2.0]]}',
                               content_type="application/json")
        _say("")
        _say(_table(rows, target))
        statuses = Counter(r["status"] for r in single)
        _say(f"\nsingle triggered requests answered HTTP {dict(statuses)} (403 = rejected); a malformed request "
             f"answered {status}: {json.loads(text).get('error', text)}")
        lines = _metric_lines(server)
        _say(f"\nguard metrics on {server.urls['metrics']}/metrics:")
        _say("\n".join("  " + line for line in lines) if lines else "  (none yet)")
    finally:
        if args.keep_running:
            _say(f"\nTorchServe keeps running: guard stop --run-dir {server.run_dir}")
        else:
            server.stop()
            _say("\nTorchServe stopped.")
    _say(f"demo done in {time.perf_counter() - t0:.0f}s")
    return 0


def _metric_lines(server, timeout: float = 20.0) -> list[str]:
    """guard_* sample lines from the metrics port, waiting (bounded) for the error count to arrive."""
    from guard.torchserve.client import guard_metric_lines, http

    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        status, body = http(f"{server.urls['metrics']}/metrics")
        lines = guard_metric_lines(body.decode(errors="replace")) if status == 200 else []
        if any('verdict="error"' in line for line in lines):
            break
        time.sleep(0.5)
    return lines

