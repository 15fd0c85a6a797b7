"""The peers' benchmark figures: every peer scored on the guard's own clean and triggered inputs.

Each peer is fitted on clean held-out images and scored on the same ``neg`` (clean) and ``pos``
(triggered) inputs as the guard, and reported with :func:`guard.bench.evaluation.separation` (AUROC,
TPR at the threshold that lets 1% of ``neg`` through), its cost in forward passes per input and its
measured time per input. A peer that cannot run on the model reports ``available: false`` and why.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from guard.bench.evaluation import separation
from guard.bench.peers._common import PeerUnavailable
from guard.bench.peers.ibd_psc import IBDPSC
from guard.bench.peers.scale_up import ScaleUp
from guard.bench.peers.ted import TED, TEDPlusPlus


def _timed(score, neg: np.ndarray, pos: np.ndarray) -> tuple[Any, Any, float]:
    t0 = time.perf_counter()
    sn, sp = score(neg), score(pos)
    return sn, sp, (time.perf_counter() - t0) / max(len(neg) + len(pos), 1) * 1e3


def peer_rows(model: nn.Module, clean_x: np.ndarray, clean_y: np.ndarray, neg: np.ndarray, pos: np.ndarray, *,
              fpr: float = 0.01, seed: int = 0, strip: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{"strip": ..., "ibd_psc": ..., "scale_up": ..., "ted": ..., "ted_pp": ...}`` on one model; ``strip`` is
    the STRIP row already measured."""
    out: dict[str, dict[str, Any]] = {}
    if strip is not None:
        out["strip"] = {"available": True, "auroc": strip["auroc"], "tpr_at_1pct_fpr": strip["tpr_at_1pct_fpr"],
                        "forwards_per_input": int(strip["n"]),
                        "seconds_per_input_ms": strip.get("seconds_per_input_ms")}
    try:
        ibd = IBDPSC(seed=seed).fit(model, clean_x, clean_y)
    except PeerUnavailable as e:
        out["ibd_psc"] = {"available": False, "reason": str(e), "forwards_per_input": IBDPSC().forwards_per_input}
    else:
        sn, sp, ms = _timed(ibd.score, neg, pos)
        out["ibd_psc"] = {"available": True, **separation(sn, sp, fpr=fpr),
                          "forwards_per_input": ibd.forwards_per_input, "seconds_per_input_ms": round(ms, 3),
                          "layers": len(ibd.layers_), "start": ibd.start_,
                          "rungs": [[k, round(f, 4)] for k, f in ibd.rungs_], "clean_error": ibd.clean_error_}
    su = ScaleUp(seed=seed).fit(model, clean_x)
    sn, sp, ms = _timed(su.score_variants, neg, pos)
    out["scale_up"] = {"available": True, **separation(sn["data_free"], sp["data_free"], fpr=fpr),
                       "forwards_per_input": su.forwards_per_input, "seconds_per_input_ms": round(ms, 3),
                       "scales": list(su.scales),
                       "data_limited": separation(sn["data_limited"], sp["data_limited"], fpr=fpr)}
    for key, cls in (("ted", TED), ("ted_pp", TEDPlusPlus)):
        try:
            est = cls(seed=seed).fit(model, clean_x, clean_y)
        except PeerUnavailable as e:
            out[key] = {"available": False, "reason": str(e), "forwards_per_input": cls().forwards_per_input}
            continue
        sn, sp, ms = _timed(est.score, neg, pos)
        out[key] = {"available": True, **separation(sn, sp, fpr=fpr),
                    "forwards_per_input": est.forwards_per_input, "seconds_per_input_ms": round(ms, 3),
                    "layers": len(est.layers_), "references": int(len(est.ref_labels_))}
    return out


def best_peer(peers: dict[str, dict[str, Any]]) -> tuple[str | None, float | None]:
    """The peer (or peer variant) with the highest TPR at 1% FPR among those that ran: ``(name, tpr)``."""
    best: tuple[str | None, float | None] = (None, None)
    for name, row in peers.items():
        if not row.get("available"):
            continue
        cands = [(name, row.get("tpr_at_1pct_fpr"))]
        cands += [(f"{name}.{k}", v.get("tpr_at_1pct_fpr")) for k, v in row.items() if isinstance(v, dict)]
        for n, v in cands:
            if v is not None and (best[1] is None or v > best[1]):
                best = (n, v)
    return best
