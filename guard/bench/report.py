"""Render ``results.json`` as ``results.md``: the attack table, the performance table, the target checklist.

Everything shown is read from the results; nothing is typed in by hand. A missing figure (a method
not run, an error) shows as ``n/a`` with the reason recorded in the JSON.
"""

from __future__ import annotations

from typing import Any

from guard.bench.provenance import describe


def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def _det(d: dict[str, Any] | None, key: str = "detected") -> str:
    if d is None:
        return "n/a"
    return "**yes**" if d.get(key) else "no"


def _best_check(online: dict[str, Any]) -> str:
    best = None
    for name, v in online.items():
        if name.startswith("combined") or name == "opt_in" or not v:
            continue
        if best is None or (v["auroc"] or 0) > (best[1]["auroc"] or 0):
            best = (name, v)
    return "n/a" if best is None else f"{best[0]} {_f(best[1]['auroc'])}"


def _nets(results: dict[str, Any]) -> list[str]:
    """The networks of the run, in the order their rows come (older results: DemoNet only)."""
    return (results.get("config") or {}).get("nets") or ["demo_net"]


def _label(a: dict[str, Any], results: dict[str, Any]) -> str:
    """An attack row's name, with its network where the run has more than one."""
    return a["name"] if len(_nets(results)) == 1 else f"{a['name']} ({a.get('net', 'demo_net')})"


def _by_net(results: dict[str, Any], key: str = "attacks") -> list[dict[str, Any]]:
    """The rows of ``key`` grouped by network, in the run's network order."""
    order = {n: i for i, n in enumerate(_nets(results))}
    return sorted(results[key], key=lambda a: order.get(a.get("net", "demo_net"), len(order)))


def _purify_measured(row: dict[str, Any], bar: str) -> str:
    """What a purification target measured: ``auto``'s real attack success and accuracy drop at the bar's
    images per class, and for the best-or-tied bar the best method's."""
    n = bar.rsplit("_per_class", 1)[0].rsplit("_", 1)[1]
    size = row["purification"]["per_class"][n]
    by = {r["method"]: r for r in size["rows"]}
    auto = by["auto"]

    def fig(r: dict[str, Any]) -> str:
        if not r.get("ok"):
            return "refused"
        return f"{_pct(r['real_asr_after'])}, {_f(r['accuracy_drop_points'], 1)} pt"

    if "best_or_tied" in bar:
        best = size.get("best")
        return f"auto {fig(auto)}" + ("" if best in (None, "auto") else f" vs {best} {fig(by[best])}")
    if "attack_success" in bar:
        return _pct(auto["real_asr_after"]) if auto.get("ok") else "refused"
    return f"{_f(auto['accuracy_drop_points'], 1)} pt" if auto.get("ok") else "refused"


def _grid_lines(grid: list[dict[str, Any]], net: str) -> list[str]:
    """One performance row per (route, batch size, clients) of a TorchServe throughput grid."""
    out = []
    for cell in grid:
        route = "through nginx" if cell["route"] == "via_ingress" else "on TorchServe's port"
        out.append(f"| {net} TorchServe throughput guarded / baseline, batch size {cell['batch_size']}, "
                   f"{cell['clients']} clients, {route} | {_f(cell['ratio'])} ({cell['guarded_rps_median']} vs "
                   f"{cell['baseline_rps_median']} req/s; rounds {cell['pair_ratios']}) |")
    return out


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(scope, bar, measured, met) for every target the benchmark checks."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for a in _by_net(results):
        comb, rep, strip = a["online"]["combined"], a["repair"], a["strip"]
        for bar, met in a["targets"].items():
            if bar.startswith("combined_tpr_at_1pct_fpr>=strip"):
                meas = f"{_pct(comb['tpr_at_1pct_fpr'])} vs STRIP {_pct(strip['tpr_at_1pct_fpr'])}"
            elif bar.startswith("combined_tpr_at_1pct_fpr>=best_peer"):
                from guard.bench.peers.evaluate import best_peer

                peer, tpr = best_peer(a.get("peers") or {"strip": {"available": True, **strip}})
                meas = f"{_pct(comb['tpr_at_1pct_fpr'])} vs {peer} {_pct(tpr)}"
            elif bar.endswith("after_purification<=0.25"):
                from guard.bench.attackers import worst_after_purification

                ap = a["graybox"]["after_purification"]
                meas = (f"max {_pct(worst_after_purification(ap))} over {len(ap['budgets'])} budgets "
                        f"(purified: {ap['method']})")
            elif bar.startswith(("whitebox_residual", "graybox_residual")):
                wb = a[bar.split("_")[0]]
                key = "max_residual_attack_success" + ("_with_memory" if "with_memory" in bar else "")
                meas = f"max {_pct(wb[key])} over {len(wb['budgets'])} budgets"
            elif bar.startswith("combined_tpr"):
                meas = _pct(comb["tpr_at_1pct_fpr"])
            elif bar.startswith("combined_auroc"):
                meas = _f(comb["auroc"])
            elif bar.startswith("repair_attack"):
                meas = _pct(rep["attack_success_rate"])
            elif bar.startswith("purify_"):
                meas = _purify_measured(a, bar)
            else:
                meas = f"{_f(rep['clean_accuracy_loss_points'], 2)} pt"
            rows.append((_label(a, results), bar, meas, met))
    p = results.get("performance") or {}
    p50 = (p.get("guard_overhead_p50_ratio") or {}).get("batch_1")
    rows.append(("performance", "guard_overhead_p50_ratio (batch 1) <= 1.15", _f(p50),
                 None if p50 is None else p50 <= 1.15))
    s = p.get("nc_batched_speedup")
    rows.append(("performance", "nc_batched_speedup >= 5 (10 labels)", _f(s, 2), None if s is None else s >= 5))
    t = p.get("torchserve_throughput_ratio")
    rows.append(("performance", "torchserve_throughput_ratio >= 0.9", _f(t), None if t is None else t >= 0.9))
    rn = p.get("resnet18") or {}
    for key, bar, ok in (("guard_overhead_p50_ratio", "<= 1.05 (batch 1)", lambda v: v <= 1.05),
                         ("torchserve_throughput_ratio", ">= 0.95", lambda v: v >= 0.95)):
        if rn:
            v = rn.get(key)
            rows.append(("performance (resnet18)", f"{key} {bar}", _f(v), None if v is None else ok(v)))
    sc = p.get("scan_scaling") or {}
    by = sc.get("scan_seconds_by_classes") or {}
    if "10" in by and "1000" in by:
        r = sc.get("ratio_max_over_min_classes")
        rows.append(("performance", "scan seconds at 1000 classes <= 5x at 10", f"{_f(r, 2)}x "
                     f"({by['10']:.0f} s vs {by['1000']:.0f} s)", None if r is None else r <= 5))
        for k in ("100", "1000"):
            row = (sc.get("by_classes") or {}).get(k) or {}
            bd, cl = row.get("backdoored") or {}, row.get("clean") or {}
            if bd and cl:
                ok = bool(bd.get("target_found")) and not cl.get("false_alarm")
                rows.append(("performance", f"scan at {k} classes: target found, clean twin not flagged",
                             f"flagged {bd['suspect_labels']} / clean twin {cl['suspect_labels']}", ok))
    return rows


def render(results: dict[str, Any]) -> str:
    """The Markdown report of one benchmark run."""
    cfg, m = results["config"], results["machine"]
    lines = [f"# guard bench ({cfg['preset']})", "",
             f"- command: `{results.get('command') or 'guard bench'}`",
             f"- date: {results['date']}, total {results.get('seconds', 0):.0f} s wall, "
             f"{results.get('cpu_seconds', 0):.0f} s CPU (this process and its workers; TorchServe not counted), "
             f"jobs: {m.get('jobs', 1)}",
             f"- code: {describe(results.get('code') or {})}",
             f"- machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
             f"(torch threads: {m['torch_threads']}), "
             f"load average {m.get('load_average_1m_at_start')} at start, {m.get('load_average_1m_at_end')} at end "
             f"({m.get('threads_reason', '')})",
             f"- zoo: {', '.join(_nets(results))} on glyphs, {cfg['zoo']['n_train']} training images, "
             f"epochs: {cfg['zoo']['epochs']}, "
             f"seed {cfg['zoo']['seed']}; {cfg['n_clean']} clean images for scan + calibration; per attack "
             f"{cfg['n_eval']} clean and up to {cfg['n_eval']} triggered test images; FPR {cfg['fpr']}",
             "- every online column is measured on the same inputs at the same FPR point: the threshold that "
             "flags 1% of the clean test images (TPR@1%); *verdict* is the guard as deployed (its own "
             "calibrated thresholds), with the clean share it flagged in brackets", ""]
    lines += ["## Attacks", "",
              "| attack | clean acc | ASR | NC | DL-TND | DF-TND | blend | best check (AUROC) | guard AUROC "
              "| guard TPR@1% "
              "| guard verdict TPR (FPR) | STRIP AUROC | STRIP TPR@1% | ART STRIP TPR@1% | repaired ASR "
              "| repair acc loss |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in _by_net(results):
        comb, d = a["online"]["combined"], a["detected"]
        art = a.get("art_strip")
        lines.append(
            f"| {_label(a, results)} | {_pct(a['clean_accuracy'])} | {_pct(a['attack_success_rate'])} "
            f"| {_det(d.get('neural_cleanse'))} | {_det(d.get('dl_tnd'))} | {_det(d.get('df_tnd'))} "
            f"| {_det(d.get('blend'))} "
            f"| {_best_check(a['online'])} | {_f(comb['auroc'])} | {_pct(comb['tpr_at_1pct_fpr'])} "
            f"| {_pct(comb['verdict']['tpr'])} ({_pct(comb['verdict']['fpr'])}) | {_f(a['strip']['auroc'])} "
            f"| {_pct(a['strip']['tpr_at_1pct_fpr'])} | {_pct(art['tpr_at_1pct_fpr']) if art else 'n/a'} "
            f"| {_pct(a['repair']['attack_success_rate'])} | {_f(a['repair']['clean_accuracy_loss_points'], 2)} pt |")
    lines += ["", "Per check (AUROC / TPR@1%):", "",
              "| attack | " + " | ".join(_check_names(results)) + " | guard, successful triggers only "
              "| opt-in flip check | guard + flip |",
              "|---|" + "---|" * (len(_check_names(results)) + 3)]
    for a in _by_net(results):
        cells = []
        for n in _check_names(results):
            v = a["online"].get(n)
            cells.append("n/a" if not v else f"{_f(v['auroc'])} / {_pct(v['tpr_at_1pct_fpr'])}")
        succ = a["online"].get("combined_successful") or {}
        cells.append(f"{_f(succ.get('auroc'))} / {_pct(succ.get('tpr_at_1pct_fpr'))} (n={succ.get('n', 'n/a')})")
        opt = a["online"].get("opt_in") or {}
        for key in ("flip", "combined_with_flip"):
            v = opt.get(key) or {}
            cells.append(f"{_f(v.get('auroc'))} / {_pct(v.get('tpr_at_1pct_fpr'))}")
        lines.append(f"| {_label(a, results)} | " + " | ".join(cells) + " |")
    lines += (_peer_lines(results) + _whitebox_lines(results) + _graybox_lines(results)
              + _after_purification_lines(results) + _stream_lines(results) + _purification_lines(results))
    if results.get("clean_models"):
        lines += ["", "Clean models (offline false positives):", ""]
        for c in _by_net(results, "clean_models"):
            d = c["detected"]
            fp = {k: _det(d.get(k), "false_positive") for k in ("neural_cleanse", "dl_tnd", "df_tnd", "blend")}
            lines.append(f"- {_label(c, results)} (clean acc {_pct(c['clean_accuracy'])}): flagged by "
                         f"NC {fp['neural_cleanse']}, DL-TND {fp['dl_tnd']}, DF-TND {fp['df_tnd']}, "
                         f"blend {fp['blend']}")
    if not results.get("art_strip_available") or results.get("art_strip_reason"):
        lines += ["", f"ART STRIP: {results.get('art_strip_reason')}"]
    p = results.get("performance") or {}
    lines += ["", "## Performance", "",
              f"On the {p.get('model')} model ({p.get('net', 'demo_net')}); "
              f"checks {', '.join(p.get('checks') or [])}.", "",
              "| figure | value |", "|---|---|"]
    for b in ("batch_1", "batch_32"):
        o = (p.get("overhead") or {}).get(b)
        if o:
            lines.append(f"| guard overhead {b.replace('_', ' ')}: p50 / p95 ratio "
                         f"| {_f(o['p50_ratio'])} / {_f(o['p95_ratio'])} "
                         f"(bare {o['bare_p50_ms']:.3f} ms, guarded {o['guarded_p50_ms']:.3f} ms at p50; hook held "
                         f"as in serving; registered per call: {_f(o.get('per_call_hook_p50_ratio'))}) |")
    nc = p.get("nc_batched")
    if nc:
        lines.append(f"| batched Neural Cleanse speedup ({nc['labels']} labels, {nc['rounds']} rounds each) "
                     f"| {_f(nc['nc_batched_speedup'], 2)}x ({nc['batched_seconds']:.1f} s vs "
                     f"{nc['per_label_loop_seconds']:.1f} s; "
                     f"flagged {nc['batched']['flagged_labels']} vs {nc['per_label_loop']['flagged_labels']}) |")
    fc = p.get("flip_check_cost_batch_1")
    if fc:
        lines.append(f"| opt-in flip check, batch 1: forward + mirrored forward over bare | {_f(fc['ratio'])} |")
    bd = p.get("overhead_breakdown_batch_1_us")
    if bd:
        parts = ", ".join(f"{k} {('yes' if v else 'no') if isinstance(v, bool) else f'{v:.1f}'}" for k, v in bd.items())
        lines.append(f"| guard batch-1 breakdown (median µs) | {parts} |")
    sb = p.get("serving_breakdown_us")
    if sb:
        for side in ("guarded", "baseline"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sb[side].items())
            lines.append(f"| a served request's stages in the worker, {side} handler (median µs) | {parts} |")
    sc = p.get("scan") or {}
    lines.append(f"| scan seconds (median over attacks): profile (NC + checks) / DL-TND / DF-TND "
                 f"| {_f(p.get('scan_seconds'), 1)} / {_f(sc.get('dl_tnd_median'), 1)} / "
                 f"{_f(sc.get('df_tnd_median'), 1)} |")
    by = p.get("scan_seconds_by_classes")
    if by:
        lines.append("| Neural Cleanse default scan seconds at " + " / ".join(by) + " classes (composed glyphs) | "
                     + " / ".join(f"{v:.1f}" for v in by.values()) + " |")
    for size, d in ((p.get("size_scaling") or {}).get("by_size") or {}).items():
        lines.append(f"| guard scan at {size}x{size} (torchvision ResNet-18 layout, BadNets {d['patch_side']}px "
                     f"patch): profile + warp reversal seconds; verdicts; guard stopped / clean rejected | "
                     f"{d['profile_seconds']:.0f} + {d['warp_seconds']:.0f}; NC {d['suspect_labels']}, warp "
                     f"{d['warp_suspect_labels']}; {d['triggered_stopped']:.1%} / {d['clean_rejected']:.1%} |")
    rn = p.get("resnet18")
    if rn:
        lines.append(f"| ResNet-18 layout (BadNets): guard overhead p50 ratio batch 1 / batch 32; TorchServe "
                     f"throughput ratio | {_f(rn.get('guard_overhead_p50_ratio'))} / "
                     f"{_f(rn.get('guard_overhead_batch32_ratio'))}; {_f(rn.get('torchserve_throughput_ratio'))} |")
    ts = p.get("torchserve") or {}
    if "torchserve_throughput_ratio" in ts:
        lines.append(f"| TorchServe throughput guarded / baseline | {_f(ts['torchserve_throughput_ratio'])} "
                     f"({ts['guarded_rps_median']} vs {ts['baseline_rps_median']} req/s, "
                     f"{ts['config']['concurrency']} clients) |")
        for clients, ratio in (ts.get("ingress_throughput_ratio") or {}).items():
            lines.append(f"| guarded throughput through the nginx ingress / TorchServe's port directly, {clients} "
                         f"clients | {_f(ratio)} |")
        lines += _grid_lines(ts.get("grid") or [], "DemoNet")
    else:
        why = ts.get("skipped") or ts.get("error", "")[:200]
        lines.append(f"| TorchServe throughput guarded / baseline | n/a ({why}) |")
    rn_ts = (rn or {}).get("torchserve") or {}
    lines += _grid_lines(rn_ts.get("grid") or [], "ResNet-18 layout")
    lines += ["", "## Targets", "", "| scope | target | measured | met |", "|---|---|---|---|"]
    for scope, bar, meas, met in targets(results):
        lines.append(f"| {scope} | {bar} | {meas} | {'n/a' if met is None else ('yes' if met else '**no**')} |")
    return "\n".join(lines) + "\n"


def _check_names(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for a in results["attacks"]:
        for n in a["online"]:
            if not n.startswith("combined") and n != "opt_in" and n not in names:
                names.append(n)
    return names


def _peer_cell(v: dict[str, Any] | None) -> str:
    if not v:
        return "n/a"
    if not v.get("available", True):
        return f"n/a ({v.get('reason', 'not run')})"
    return f"{_f(v.get('auroc'))} / {_pct(v.get('tpr_at_1pct_fpr'))}"


def _peer_lines(results: dict[str, Any]) -> list[str]:
    """The input-level peers beside the guard, same inputs and FPR point (AUROC / TPR@1%)."""
    rows = [a for a in _by_net(results) if a.get("peers")]
    if not rows:
        return []
    first = rows[0]["peers"]
    fwd = {k: (first.get(k) or {}).get("forwards_per_input", "n/a")
           for k in ("strip", "ibd_psc", "scale_up", "ted", "ted_pp")}
    lines = ["", "Input-level peers (AUROC / TPR@1%; forward passes per input in the header):", "",
             f"| attack | guard (1) | STRIP ({fwd['strip']}) | IBD-PSC ({fwd['ibd_psc']}) "
             f"| SCALE-UP ({fwd['scale_up']}) | SCALE-UP data-limited ({fwd['scale_up']}) "
             f"| TED ({fwd['ted']}) | TED++ ({fwd['ted_pp']}) |",
             "|---|---|---|---|---|---|---|---|"]
    for a in rows:
        p, comb = a["peers"], a["online"]["combined"]
        cells = [p.get("strip"), p.get("ibd_psc"), p.get("scale_up"), (p.get("scale_up") or {}).get("data_limited"),
                 p.get("ted"), p.get("ted_pp")]
        lines.append(f"| {_label(a, results)} | {_f(comb['auroc'])} / {_pct(comb['tpr_at_1pct_fpr'])} | "
                     + " | ".join(_peer_cell(v) for v in cells) + " |")
    return lines


def _whitebox_lines(results: dict[str, Any]) -> list[str]:
    """The white-box attacker's budgets: bare success, success through the guard, rejection rate."""
    rows = [a for a in _by_net(results) if a.get("whitebox")]
    if not rows:
        return []
    lines = ["", "White-box attacker (trigger optimised against a differentiable copy of the guard's statistic; a "
             "budget that evades the memory also drives down the residual similarity of its queries):", "",
             "| attack | budget (steps, weight) | bare attack success | through the guard | rejected "
             "| statistic mean (surrogate / guard; threshold) | with the trigger memory: through / clean rejected |",
             "|---|---|---|---|---|---|---|"]
    for a in rows:
        wb = a["whitebox"]
        for b in [dict(wb["baseline"], steps=0, weight=0.0)] + wb["budgets"]:
            lines.append(f"| {_label(a, results)} | {_budget(b)} | {_pct(b['attack_success_bare'])} "
                         f"| {_pct(b['residual_attack_success'])} | {_pct(b['rejection_rate'])} "
                         f"| {_f(b['surrogate_statistic_mean'], 1)} / {_f(b['guard_statistic_mean'], 1)}; "
                         f"{_f(wb['ensemble_threshold'], 1)} | {_memory_cell(b)} |")
        lines += _noise_lines(a, wb, results, "| |")
        if wb.get("not_in_surrogate"):
            lines.append(f"| {_label(a, results)} | not in the surrogate: {', '.join(wb['not_in_surrogate'])} "
                         "| | | | | |")
    return lines


def _budget(b: dict[str, Any]) -> str:
    """An adaptive attacker's budget: steps, weight, and the memory- and trajectory-evasion weights where it has
    them."""
    evade = f", evades the memory ({b['evade']:g})" if b.get("evade") else ""
    rank = f", evades the trajectory check ({b['rank']:g})" if b.get("rank") else ""
    return f"{b['steps']}, {b['weight']:g}{evade}{rank}"


def _noise_lines(a: dict[str, Any], section: dict[str, Any], results: dict[str, Any], tail: str) -> list[str]:
    """An adaptive attacker's strongest trigger with fresh noise on every query, one line per amplitude."""
    return [f"| {_label(a, results)} | {f['steps']}, {f['weight']:g} + fresh noise ±{f['amplitude']:g} "
            f"| {_pct(f['attack_success_bare'])} | {_pct(f['residual_attack_success'])} "
            f"| {_pct(f['rejection_rate'])} {tail} {_memory_cell(f)} |" for f in section.get("fresh_noise") or []]


def _graybox_lines(results: dict[str, Any]) -> list[str]:
    """The gray-box attacker's budgets, with the same attacker against the clean model of the same network."""
    rows = [a for a in _by_net(results) if a.get("graybox")]
    if not rows:
        return []
    floors = {c.get("net", "demo_net"): (c.get("graybox_floor") or {}) for c in results.get("clean_models", [])}
    lines = ["", "Gray-box attacker (weights and its own images, no profile: trigger re-optimised to keep the target "
             "while matching clean target-class statistics at every layer; a budget that evades the memory also "
             "drives down the residual similarity of its queries, with that weight):", "",
             "| attack | budget (steps, weight) | bare attack success | through the guard | rejected "
             "| with the trigger memory: through / clean rejected | clean model: bare / through its guard |",
             "|---|---|---|---|---|---|---|"]
    for a in rows:
        gb = a["graybox"]
        floor = floors.get(a.get("net", "demo_net"), {})
        fb = (floor.get("attacks") or {}).get(a["name"])
        top = floor.get("budget") or {}
        for b in [dict(gb["baseline"], steps=0, weight=0.0)] + gb["budgets"]:
            plain = not (b.get("evade") or b.get("rank"))
            same = fb is not None and plain and (b["steps"], b["weight"]) == (top.get("steps"), top.get("weight"))
            ref = f"{_pct(fb['attack_success_bare'])} / {_pct(fb['residual_attack_success'])}" if same else ""
            lines.append(f"| {_label(a, results)} | {_budget(b)} | {_pct(b['attack_success_bare'])} "
                         f"| {_pct(b['residual_attack_success'])} | {_pct(b['rejection_rate'])} "
                         f"| {_memory_cell(b)} | {ref} |")
        lines += [line + " |" for line in _noise_lines(a, gb, results, "|")]
    return lines


def _after_purification_lines(results: dict[str, Any]) -> list[str]:
    """The gray-box keys (optimised on the attacked weights) against the purified model and a fresh scan of it."""
    rows = [a for a in _by_net(results) if (a.get("graybox") or {}).get("after_purification")]
    if not rows:
        return []
    lines = ["", "The same gray-box keys against the purified model (purified with the fewest clean images per "
             "class of the run, rescanned on the row's clean images; the attacker never had these weights):", "",
             "| attack | purified by | suspects after | budget (steps, weight) | bare attack success "
             "| through the checks | with the trigger memory: through / clean rejected |",
             "|---|---|---|---|---|---|---|"]
    for a in rows:
        ap = a["graybox"]["after_purification"]
        by = f"{ap['method']}" + (f" ({ap['chosen']})" if ap.get("chosen") else "") + f", {ap['per_class']} per class"
        if not ap.get("ok"):
            lines.append(f"| {_label(a, results)} | {by} | refused: no state within the bound | | | | |")
            continue
        sus = ", ".join(map(str, ap["suspect_labels"])) or "none"
        for b in ap["budgets"]:
            lines.append(f"| {_label(a, results)} | {by} | {sus} | {_budget(b)} | {_pct(b['attack_success_bare'])} "
                         f"| {_pct(b['residual_attack_success'])} | {_memory_cell(b)} |")
    return lines


def _memory_cell(b: dict[str, Any]) -> str:
    if b.get("residual_attack_success_with_memory") is None:
        return "no memory"
    return f"{_pct(b['residual_attack_success_with_memory'])} / {_pct(b['clean_rejected_with_memory'])}"


def _stream_lines(results: dict[str, Any]) -> list[str]:
    """Each row's triggered inputs among its clean ones, through the default guard and without the memory."""
    rows = [a for a in _by_net(results) if a.get("stream")]
    if not rows:
        return []
    share = rows[0]["stream"]["default"]["attack_share"]
    lines = ["", f"On a stream (one triggered query in {round(1 / share)} among the clean test images after the "
             "last one they are stamped on, after the calibration images as history): triggered inputs through, "
             "clean rejected:", "",
             "| attack | memory watches | default guard: through / clean rejected (by the memory) "
             "| without the memory: through / clean rejected |", "|---|---|---|---|"]
    for a in rows:
        st = a["stream"]
        d, w, watches = st["default"], st["without_memory"], st["memory_watches"]
        watch = ("no memory" if watches is None else watches if isinstance(watches, str)
                 else ", ".join(map(str, watches)))
        watch += "" if st.get("memory_fpr") is None else f" (FPR {100 * st['memory_fpr']:g}%)"
        lines.append(f"| {_label(a, results)} | {watch} | {_pct(d['residual_attack_success'])} / "
                     f"{_pct(d['clean_rejected'])} ({_pct(d['clean_rejected_by_memory'])}) "
                     f"| {_pct(w['residual_attack_success'])} / {_pct(w['clean_rejected'])} |")
    return lines


def _purification_lines(results: dict[str, Any]) -> list[str]:
    """Each purification method per attack and clean-image budget: the attacker's real trigger before and
    after, test accuracy lost, and how much of the attack one epoch of re-tuning with 1% poison brings back."""
    rows = [a for a in _by_net(results) if a.get("purification")]
    if not rows:
        return []
    lines = ["", "Purification (`guard purify` methods; real trigger never seen by any method; comeback: the real "
             "trigger's success after each quarter of one epoch of fine-tuning with 1% poisoned images; relapse: "
             "the reversed triggers' success after the same epoch poisoned with them, what `guard purify` reports):",
             "", "| attack | images per class | method | selected | real attack success | test accuracy lost (points) "
             "| comeback | relapse |", "|---|---|---|---|---|---|---|---|"]
    for a in rows:
        for n, size in a["purification"]["per_class"].items():
            for r in size["rows"]:
                come = " / ".join(_pct(v) for v in r.get("comeback_asr") or []) or ""
                after = _pct(r["real_asr_after"]) if r["ok"] else "refused"
                best = " (best)" if r["method"] == size["best"] else ""
                lines.append(f"| {_label(a, results)} | {n} | {r['method']}{best} | {r.get('selected') or ''} "
                             f"| {_pct(r['real_asr_before'])} -> {after} | {_f(r['accuracy_drop_points'], 1)} "
                             f"| {come} | {_pct(r['relapse']) if r.get('relapse') is not None else ''} |")
    return lines
