"""Purification benchmark: each method on a backdoored model with a few clean images per class, judged
with the attacker's *real* trigger (which no method ever sees) and the clean accuracy on test images
none of them sees, and how fast the backdoor comes back when the purified model is fine-tuned again.

:func:`purification_rows` is the entry point: given a model, its attack, a clean pool and test data,
it draws ``per_class`` clean images per class (seeded), scans them as ``guard scan`` would (unless a
profile is given), runs ``auto`` (whose candidate methods each report their own row, measured from the
same run) and the published baselines within the same accuracy bound, and returns one row per
method. ``python -m guard.bench.purification`` prints the rows for the demo worlds (DemoNet BadNets,
DemoNet Blended, GapNet BadNets); with ``--cross-fit FOLDS`` it prints :func:`cross_fit_row` instead: how the
held-out quarter's and the cross-fitted drop (:mod:`guard.purify.bound`) compare with the test images' drop.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from guard.demo.train import attack_success
from guard.model import accuracy

METHODS = ("auto", "fine-pruning", "unlearn", "anp")
"""Methods run on every row; ``auto`` also yields a row per method it tried (combined, sau, bn-tune, rnp)."""


def per_class_subset(x: np.ndarray, y: np.ndarray, n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of each class (fewer where a class has fewer), seeded."""
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:n] for c in np.unique(y)]))
    return x[idx], y[idx]


def comeback(model: nn.Module, attack, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
             rate: float = 0.01, epochs: int = 1, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """How fast the backdoor returns (PAM's question: is a low attack success superficial?): fine-tune a
    copy of ``model`` on ``(x, y)`` with ``rate`` of it poisoned by ``attack`` for ``epochs`` epochs
    (Adam, train mode) and return the real trigger's attack success on the test data after each
    quarter of the steps (four figures per epoch)."""
    import torch

    from guard.purify.relapse import retuned

    xp, yp = attack.poison(x, y, rate=rate, seed=seed)
    out: list[float] = []
    steps = max(1, (len(xp) + 31) // 32)  # finetune_epochs' batches of 32
    marks = [-(-steps * q // 4) for q in range(1, 5)]  # the step ending each quarter (ceil), per epoch
    count = [0]

    def measure(mdl: nn.Module) -> None:
        count[0] += 1
        step = (count[0] - 1) % steps + 1
        was = mdl.training
        mdl.eval()
        with torch.no_grad():
            for _ in range(marks.count(step)):  # fewer than four steps: a state stands for several quarters
                out.append(attack_success(mdl, attack, x_test, y_test))
        mdl.train(was)

    retuned(model, xp, yp, epochs=epochs, lr=lr, seed=seed, after_step=measure, label="comeback")
    return out


def purification_rows(model: nn.Module, attack, x: np.ndarray, y: np.ndarray, x_test: np.ndarray,
                      y_test: np.ndarray, *, profile=None, methods=METHODS, per_class: int = 20,
                      max_drop: float = 0.02, seed: int = 0, world: str = "", with_comeback: bool = True,
                      scan=None, progress: bool | None = False, on_fit=None) -> list[dict]:
    """One row per method: the real trigger's attack success and the clean accuracy on the test data
    before and after (drop in points), the held-out figures the method itself measured, what it
    selected, its time, and (``with_comeback``) the real trigger's success while the purified model is
    fine-tuned for one epoch with 1% poisoned images, beside ``relapse``, what ``guard purify`` can see of
    that (the reversed triggers' success after the same re-tuning with them: :mod:`guard.purify.relapse`);
    a row ``"original"`` gives the same for the unpurified model. ``profile`` defaults to a fresh scan of the
    ``per_class`` subset: ``scan(model, x, y)`` (default: :func:`guard.scan.build_profile` with its defaults)
    returning the profile. ``on_fit(method, est)`` is called with each fitted estimator of ``methods`` (its
    purified model is ``est.model_`` when ``est.ok_``). A method that cannot run on the evidence (InputError:
    unlearning when neither the scan nor the blend and warp reversals found a trigger) gets a row with ``ok`` false and
    its message in ``refused``."""
    from guard.errors import InputError
    from guard.purify import Evidence, make_purifier
    from guard.purify.relapse import relapse

    xs, ys = per_class_subset(x, y, per_class, seed=seed)
    if profile is None and scan is not None:
        profile = scan(model, xs, ys)
    elif profile is None:
        from guard.scan import build_profile

        profile, _ = build_profile(model, xs, ys, seed=seed, progress=progress)
    evidence, source = Evidence.gather(model, xs, ys, profile, seed=seed)  # as guard purify does
    acc0, asr0 = accuracy(model, x_test, y_test), attack_success(model, attack, x_test, y_test)
    base = {"world": world, "attack": type(attack).__name__, "per_class": per_class,
            "suspect_labels": evidence.labels, "evidence": source["source"], "real_asr_before": asr0,
            "accuracy_before": acc0}
    fitted = []
    refused: dict[str, str] = {}  # methods that cannot run on this evidence (e.g. unlearning with no trigger)
    for method in methods:
        try:
            est = make_purifier(method, max_drop=max_drop, seed=seed, progress=progress).fit(
                model, xs, ys, evidence=evidence)
        except InputError as e:
            refused[method] = str(e)
            continue
        fitted.append((method, est))
        if on_fit is not None:
            on_fit(method, est)
        if method == "auto":
            fitted += [(f"auto:{e.method}", e) for e in est.runs_]
    rows = []
    probe = evidence.triggers(jitter=0)

    def relapsed(mdl: nn.Module) -> float | None:  # what guard purify can see of the comeback: reversed triggers
        return relapse(mdl, xs, ys, x_test, y_test, probe, seed=seed)

    if with_comeback:
        rows.append(base | {"method": "original", "ok": True, "selected": None, "real_asr_after": asr0,
                            "accuracy_after": acc0, "accuracy_drop_points": 0.0,
                            "comeback_asr": comeback(model, attack, xs, ys, x_test, y_test, seed=seed),
                            "relapse": relapsed(model)})
    for name, est in fitted:
        m = est.model_ if est.ok_ else model
        acc1 = accuracy(m, x_test, y_test)
        row = base | {
            "method": name, "ok": est.ok_, "selected": est.selected_,
            "chosen": getattr(est, "chosen_", None),
            "real_asr_after": attack_success(m, attack, x_test, y_test),
            "accuracy_after": acc1, "accuracy_drop_points": 100 * (acc0 - acc1),
            "heldout_accuracy_before": est.accuracy_before_, "heldout_accuracy_after": est.accuracy_after_,
            "heldout_drop_points": 100 * (est.accuracy_before_ - est.accuracy_after_),
            "seconds": est.seconds_}
        if with_comeback and est.ok_ and not name.startswith("auto:"):
            row["comeback_asr"] = comeback(m, attack, xs, ys, x_test, y_test, seed=seed)
            row["relapse"] = relapsed(m)
        rows.append(row)
    for name, why in refused.items():  # the row says why, and the model stays as it was
        rows.append(base | {"method": name, "ok": False, "selected": None, "chosen": None, "refused": why,
                            "real_asr_after": asr0, "accuracy_after": acc0, "accuracy_drop_points": 0.0})
    return rows


def cross_fit_row(model: nn.Module, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                  method: str = "auto", folds: int = 4, per_class: int = 20, max_drop: float = 0.02, seed: int = 0,
                  world: str = "") -> dict:
    """What each estimate of the accuracy drop says beside the truth: ``per_class`` clean images per class
    (seeded), a fresh scan of them, ``guard purify``'s run with ``--cross-fit folds`` (:func:`guard.purify.purify`,
    no rescan), and the drop of the model the held-out quarter selected on ``(x_test, y_test)``, which nothing
    saw. ``cross_fitted`` is None where the held-out images kept no state (then nothing is cross-fitted)."""
    import copy

    from guard.purify import purify
    from guard.purify.tuning import bare
    from guard.scan import build_profile

    xs, ys = per_class_subset(x, y, per_class, seed=seed)
    profile, _ = build_profile(model, xs, ys, seed=seed, progress=False)
    res = purify(model, xs, ys, profile, method=method, max_drop=max_drop, seed=seed, rescan=False, online=False,
                 probe_relapse=False, progress=False, cross_fit=folds)
    test = None
    if res.ok:
        purified = copy.deepcopy(model)
        bare(purified).load_state_dict(res.state_dict)
        test = accuracy(model, x_test, y_test) - accuracy(purified, x_test, y_test)
    d = res.details
    return {"world": world, "seed": seed, "method": method, "per_class": per_class, "selected": d["selected"],
            "held_out": d["held_out"], "held_out_drop": d["accuracy_drop"] if res.ok else None,
            "held_out_upper_95": d["accuracy_drop_upper_95"], "cross_fitted": d.get("cross_fitted"),
            "test_drop": test, "test_images": int(len(y_test))}


def _rounded(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            v = round(v, 4)
        elif isinstance(v, list) and v and isinstance(v[0], float):
            v = [round(x, 4) for x in v]
        out[k] = v
    return out


def purification_section(model: nn.Module, attack, x: np.ndarray, y: np.ndarray, x_test: np.ndarray,
                         y_test: np.ndarray, *, per_class: tuple[int, ...], methods=METHODS, max_drop: float = 0.02,
                         seed: int = 0, scan=None, on_fit=None) -> dict:
    """``guard bench``'s ``attacks[*].purification``: :func:`purification_rows` at each ``per_class``
    (a fresh scan of each subset, as a user with that many images would run), rounded, with the best
    row per size (within the bound, the lowest real-trigger success, then the smallest drop) and
    whether ``auto`` is best or tied (within one triggered test image's share of attack success, the
    figures' resolution, and 0.5 points). ``on_fit(per_class, method, est)`` sees every fitted estimator."""
    sizes = {}
    for n in per_class:
        rows = [_rounded(r) for r in purification_rows(model, attack, x, y, x_test, y_test, methods=methods,
                                                         per_class=n, max_drop=max_drop, seed=seed, scan=scan,
                                                         on_fit=None if on_fit is None else
                                                         (lambda m, e, n=n: on_fit(n, m, e)))]
        done = [r for r in rows if r["method"] not in ("original",) and r["ok"]]
        best = min(done, key=lambda r: (r["real_asr_after"], r["accuracy_drop_points"]), default=None)
        auto = next((r for r in rows if r["method"] == "auto"), None)
        tol = 1 / max(int(np.sum(attack.victims(y_test))), 1) + 5e-5  # one image; the rows are rounded to 1e-4
        tied = (auto is not None and best is not None and auto["ok"]
                and auto["real_asr_after"] <= best["real_asr_after"] + tol
                and auto["accuracy_drop_points"] <= best["accuracy_drop_points"] + 0.5)
        sizes[str(n)] = {"rows": rows, "best": best["method"] if best else None, "auto_best_or_tied": tied}
    return {"per_class": sizes, "max_drop": max_drop, "methods": list(methods)}


def format_rows(rows: list[dict]) -> str:
    """The rows as a fixed-width table (the original model's row is left out)."""
    rows = [r for r in rows if r["method"] != "original"]
    head = f"{'world':<14} {'method':<13} {'real ASR':>17} {'test acc':>15} {'drop':>6} {'held-out drop':>13} {'s':>5}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['world']:<14} {r['method']:<13} {100 * r['real_asr_before']:7.1f}% -> "
                     f"{100 * r['real_asr_after']:5.1f}% {100 * r['accuracy_before']:5.1f} -> "
                     f"{100 * r['accuracy_after']:5.1f}"
                     f" {r['accuracy_drop_points']:6.1f} {r['heldout_drop_points']:13.1f} {r['seconds']:5.0f}")
    return "\n".join(lines)


def demo_worlds(out_dir, names=("demo", "gap", "blended")):
    """``(name, model, attack, x_clean, y_clean, x_test, y_test)`` for the named benchmark worlds (seeded)."""
    from pathlib import Path

    import torch

    from guard.data import load_npz, split
    from guard.demo.attacks import BadNets, Blended
    from guard.demo.world import build
    from guard.model import load_model

    out = Path(out_dir)
    for name in names:
        if name in ("demo", "blended"):
            atk = None if name == "demo" else Blended(target=6, alpha=0.2, seed=0)
            w = build(out / name, attack=atk)
            x, y = load_npz(w.clean)
            xt, yt = load_npz(w.holdout)
            yield name, load_model(w.model_file, w.weights), w.attack, x, y, xt, yt
        elif name == "gap":
            from guard.demo.glyphs import digits
            from guard.demo.nets.gap_net import GapNet
            from guard.demo.train import train

            x, y = digits(size=16)
            xtr, ytr, xte, yte = split(x, y, 0.7, seed=0)
            atk = BadNets(target=3, size=3, position="top-left", seed=5)
            xp, yp = atk.poison(xtr, ytr, rate=0.1, seed=0)
            torch.manual_seed(0)
            yield name, train(GapNet(), xp, yp, epochs=12, seed=0, lr=3e-3), atk, xtr, ytr, xte, yte
        else:
            raise ValueError(f"unknown world {name!r}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worlds", default="demo,gap,blended")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cross-fit", type=int, default=0, metavar="FOLDS",
                   help="instead of the method rows: the held-out and the cross-fitted drop beside the test drop")
    p.add_argument("--seeds", default="0", help="subset and scan seeds of the --cross-fit rows")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, model, atk, x, y, xt, yt in demo_worlds(d, args.worlds.split(",")):
            if args.cross_fit:
                for seed in (int(v) for v in args.seeds.split(",")):
                    rows.append(cross_fit_row(model, x, y, xt, yt, method=args.methods.split(",")[0],
                                              folds=args.cross_fit, per_class=args.per_class, seed=seed, world=name))
                    print(json.dumps(rows[-1]), flush=True)
                continue
            rows += purification_rows(model, atk, x, y, xt, yt, methods=args.methods.split(","),
                                      per_class=args.per_class, world=name)
            if not args.json:
                print(format_rows([r for r in rows if r["world"] == name]), flush=True)
    if args.json and not args.cross_fit:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
