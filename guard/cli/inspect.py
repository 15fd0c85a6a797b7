"""Show a profile: the model it is bound to, suspect labels, per-label scan results, checks and
their thresholds, policy. With --model-file/--weights also verify the binding (exit 3 on mismatch)."""

from __future__ import annotations

import argparse

from guard.cli._common import print_json

HELP = "show a profile (and verify it against a model)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", help="profile directory")
    p.add_argument("--model-file")
    p.add_argument("--model-class")
    p.add_argument("--weights")
    p.add_argument("--normalize")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from guard.errors import InputError
    from guard.model import fingerprint, load_model
    from guard.profile import Profile

    sha = None
    if args.model_file or args.weights:
        if not (args.model_file and args.weights):
            raise InputError("verifying a profile needs both --model-file and --weights")
        sha = fingerprint(load_model(args.model_file, args.weights, model_class_name=args.model_class,
                                     normalize=args.normalize))
    profile = Profile.load(args.profile, model_sha256=sha)
    meta = {k: v for k, v in profile.meta.items() if k != "tensor_names"}
    meta["tensors"] = {k: list(v.shape) for k, v in sorted(profile.tensors.items())}
    weights = profile.tensors.get("ensemble.weights")
    if meta.get("ensemble") and weights is not None and len(weights) == len(meta["checks"]):
        meta["ensemble"]["weights"] = {n: round(float(w), 4) for n, w in zip(meta["checks"], weights)}
    if sha:
        meta["verified"] = True
    if args.json:
        print_json(meta)
        return 0
    print(f"profile {args.profile}: model {profile.model_sha256[:16]}…, input {profile.input_shape}, "
          f"{meta['num_classes']} classes, feature layer {meta['feature_layer']}, "
          f"inner layer {meta.get('inner_layer') or 'none'}")
    if meta.get("token_blocks"):
        print(f"  token statistics at blocks {', '.join(meta['token_blocks'])} (the token check)")
    for name, reason in (meta.get("checks_off") or {}).items():
        print(f"  check {name} is off: {reason}")
    print(f"suspect labels: {profile.suspect_labels or 'none'}; mode {meta['policy']['mode']}; fpr {meta['fpr']}")
    ens = meta.get("ensemble")
    if ens:
        print(f"  decision: {ens['method']} ensemble of {', '.join(meta['checks'])}, threshold {ens['threshold']:.4g} "
              f"(fpr {meta['fpr']:.4g}); each check's own threshold names the reasons")
    else:
        print("  decision: any check over its threshold (a profile from before the ensemble)")
    weight = (ens or {}).get("weights", {})
    for name, c in meta["checks"].items():
        w = f", weight {weight[name]:.2f} in the ensemble" if name in weight else ""
        print(f"  check {name:<11} threshold {c['threshold']:.4g} (fpr {meta['fpr']:.4g}){w}")
    for r in (meta["scan"] or {}).get("per_label", []):
        flag = "  <- suspect" if r["suspect"] else ""
        print(f"  label {r['label']:>3}: L1 {r['l1_norm']:8.2f}  index {r['anomaly_index']:6.2f} "
              f"(log {r['log_anomaly_index']:6.2f}){flag}")
    if profile.memory is not None:
        m = profile.memory
        watch = "every label" if m.get("labels") is None else f"labels {m['labels']}"
        energy = m.get("energy_threshold") or float("inf")  # absent in profiles from before the energy
        matches = m.get("matches") or 1  # absent in profiles from before it: one match
        bands = "pixels" if not m.get("coarse") else f"pixels and {m['coarse']}x{m['coarse']}-pooled"
        floor = m.get("floor_threshold")  # absent in profiles from before the noise floor
        floor = f" or its noise floor over {floor:.3g}" if floor is not None else ""
        print(f"trigger memory: watches {watch} at fpr {m['fpr']:g}, remembers {m['size']} queries "
              f"(repeated_trigger: {matches} of them over {m['threshold']:.3g} in the residual of {bands}, "
              f"residual_noise: its RMS over {energy:.3g}{floor})")
    else:
        print("trigger memory: off")
    if profile.trajectory is not None:
        t = profile.trajectory
        refs = len(profile.tensors.get("trajectory.ref_labels", ()))
        print(f"trajectory check: {len(t['layers'])} layers, {refs} references, over {t['threshold']:.4g} "
              f"(fpr {t['fpr']:g}, on top of the ensemble's)")
    if profile.warp is not None:
        w = profile.warp
        lead = max(w.per_label, key=lambda r: r["lead"])
        print(f"warp reversal: suspect labels {w.suspect_labels or 'none'} (largest lead {lead['lead']:.2f} at "
              f"label {lead['label']}, bar {w.threshold:g})")
    if sha:
        print("verified: the profile matches this model")
    return 0
