"""The audit report: ``report.json`` for machines and a self-contained ``report.html`` for people.

The HTML page carries everything inline (PNG images as base64 ``data:`` URIs, charts as SVG, one
``<style>`` block, one small script that counts decoded images) and a Content-Security-Policy that
forbids every network fetch, so it opens the same from a CI artefact store, a mail attachment or an
air-gapped laptop. Order follows what a reviewer asks first: the verdict, then why (per-label
evidence of each method, with the thresholds drawn), then where it came from (model SHA-256, data,
seeds, timings).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from guard.audit.rollout import METHODS, AuditResult
from guard.errors import InputError

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'none'; font-src 'none'; form-action 'none'; base-uri 'none'")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:0 20px 40px}
.verdict{padding:22px 20px;color:#fff;font-size:28px;font-weight:700}
.verdict small{display:block;font-size:15px;font-weight:400;opacity:.92;margin-top:4px}
.verdict.backdoored{background:#b42318}.verdict.clean{background:#067647}
h2{margin:28px 0 8px;font-size:19px;border-bottom:1px solid #d0d5dd;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;width:100%;margin:8px 0}
th,td{border:1px solid #e4e7ec;padding:5px 8px;text-align:left;vertical-align:middle}
th{background:#f2f4f7;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.suspect td{background:#fef3f2}
.flag{color:#b42318;font-weight:700}
img.px{image-rendering:pixelated;width:96px;height:96px;border:1px solid #d0d5dd;background:#fff}
.chart{background:#fff;border:1px solid #e4e7ec;margin:8px 0}
.note{color:#475467;font-size:13px}
code{font-size:12px;word-break:break-all}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) ok += 1; });
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(ok));
});
"""


def png_data_uri(arr: np.ndarray, *, scale: int = 1) -> str:
    """A ``(1, H, W)`` or ``(3, H, W)`` array in [0, 1] as an inline PNG (``data:image/png;base64,...``)."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    a = np.clip(np.nan_to_num(a), 0, 1)
    img8 = (a * 255 + 0.5).astype(np.uint8)
    if img8.shape[0] == 1:
        im = Image.fromarray(img8[0], mode="L")
    else:
        im = Image.fromarray(img8[:3].transpose(1, 2, 0), mode="RGB")
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bar_chart_svg(values: list[float], *, threshold: float | None, title: str, labels: list[str],
                  highlight: set[int] | None = None, y_label: str = "", chart_id: str = "") -> str:
    """A bar chart of ``values`` per label with a dashed threshold line, as inline SVG."""
    highlight = highlight or set()
    w, h, left, right, top, bottom = 640, 240, 52, 16, 30, 36
    vals = [float(v) if np.isfinite(v) else 0.0 for v in values]
    lo = min(0.0, min(vals, default=0.0), threshold if threshold is not None else 0.0)
    hi = max(0.0, max(vals, default=0.0), threshold if threshold is not None else 0.0)
    if hi - lo < 1e-9:
        hi = lo + 1.0
    pad = 0.08 * (hi - lo)
    lo, hi = lo - (pad if lo < 0 else 0), hi + pad
    ph, pw = h - top - bottom, w - left - right

    def ypos(v: float) -> float:
        return top + (hi - v) / (hi - lo) * ph

    n = max(len(vals), 1)
    bw = pw / n
    parts = [f'<svg class="chart" id="{html.escape(chart_id)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="18" font-size="13" font-weight="600">{html.escape(title)}</text>']
    for t in np.linspace(lo, hi, 5):
        y = ypos(float(t))
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaecf0"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{t:.3g}</text>')
    y0 = ypos(0.0)
    for i, v in enumerate(vals):
        x = left + i * bw + bw * 0.15
        y1, y2 = sorted((ypos(v), y0))
        colour = "#d92d20" if i in highlight else "#528bff"
        parts.append(f'<rect class="bar" data-label="{html.escape(labels[i])}" data-value="{v:.4g}" x="{x:.1f}" '
                     f'y="{y1:.1f}" width="{bw * 0.7:.1f}" height="{max(y2 - y1, 0.5):.1f}" fill="{colour}">'
                     f'<title>{html.escape(labels[i])}: {v:.4g}</title></rect>')
        parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{h - bottom + 14}" font-size="11" '
                     f'text-anchor="middle">{html.escape(labels[i])}</text>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#667085"/>')
    if threshold is not None:
        yt = ypos(threshold)
        parts.append(f'<line class="threshold" x1="{left}" x2="{w - right}" y1="{yt:.1f}" y2="{yt:.1f}" '
                     f'stroke="#b42318" stroke-width="1.5" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{w - right}" y="{yt - 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#b42318">threshold {threshold:.3g}</text>')
    if y_label:
        parts.append(f'<text x="12" y="{top + ph / 2:.1f}" font-size="11" transform="rotate(-90 12 '
                     f'{top + ph / 2:.1f})" text-anchor="middle">{html.escape(y_label)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{h - 4}" font-size="11" text-anchor="middle">label</text>')
    parts.append("</svg>")
    return "".join(parts)


def _img(uri: str, cls: str, label: int, alt: str) -> str:
    return f'<img class="px {cls}" data-label="{label}" alt="{html.escape(alt)}" src="{uri}">'


def _isolation_rule(b: dict[str, Any]) -> str:
    """The isolation bar's clause of the Neural Cleanse rule, where the block records it."""
    bar = b.get("isolation")
    if bar is None:
        return " and its isolation (its L1 norm over the cheapest natural label's) is under the scan's bar"
    return f" and its L1 norm is at most {bar:g} times the cheapest natural label's (isolation)"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _label_chart(block: dict[str, Any], key: str, threshold: float, title: str, y_label: str,
                 chart_id: str) -> str:
    """One bar per label of ``block["per_label"][*][key]`` with the decision line, flagged labels highlighted."""
    rows = block["per_label"]
    flagged = set(block["suspect_labels"])
    return bar_chart_svg([r.get(key, 0.0) for r in rows], threshold=threshold, labels=[str(r["label"]) for r in rows],
                         highlight={i for i, r in enumerate(rows) if r["label"] in flagged}, title=title,
                         y_label=y_label, chart_id=chart_id)


def _nc_section(s: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    b = s["neural_cleanse"]
    rows = b["per_label"]
    flagged = set(b["suspect_labels"])
    chart = _label_chart(b, "anomaly_index", b["threshold"], "Neural Cleanse anomaly index (raw L1 norms)",
                         "anomaly index", "chart-nc")
    chart_log = _label_chart(b, "log_anomaly_index", b["threshold"],
                             "Neural Cleanse anomaly index (log-scale L1 norms)", "anomaly index", "chart-nc-log")
    masks, patterns = arrays.get("neural_cleanse.masks"), arrays.get("neural_cleanse.patterns")
    body = []
    for i, r in enumerate(rows):
        lab = int(r["label"])
        imgs = ["", "", ""]
        if masks is not None and patterns is not None and i < len(masks):
            m, p = masks[i], patterns[i]
            imgs = [_img(png_data_uri(m, scale=4), "mask", lab, f"label {lab} reversed mask"),
                    _img(png_data_uri(p, scale=4), "pattern", lab, f"label {lab} reversed pattern"),
                    _img(png_data_uri(m * p, scale=4), "trigger", lab, f"label {lab} mask × pattern")]
        flag = '<span class="flag">suspect</span>' if lab in flagged else ""
        body.append(f'<tr class="{"suspect" if lab in flagged else ""}" data-label="{lab}"><td>{lab}</td>'
                    f"<td>{imgs[0]}</td><td>{imgs[1]}</td><td>{imgs[2]}</td>"
                    f'<td class="num">{_fmt(r["l1_norm"], 2)}</td><td class="num">{_fmt(r["anomaly_index"], 2)}</td>'
                    f'<td class="num">{_fmt(r.get("log_anomaly_index"), 2)}</td>'
                    f'<td class="num">{_fmt(r.get("isolation"), 2)}</td>'
                    f'<td class="num">{_fmt(r.get("attack_success"), 3)}</td><td>{flag}</td></tr>')
    src = " (reused from the profile)" if b.get("source") == "profile" else ""
    return (f'<section id="neural-cleanse"><h2>Neural Cleanse{src}</h2>'
            f'<p class="note">For every label the smallest mask and pattern that send clean images to it. '
            f'A label is suspect when its L1 norm lies below the median, its MAD anomaly index (raw or '
            f'log scale) exceeds {b["threshold"]:g}{_isolation_rule(b)}. Decision: <b>{b["decision"]}</b>; '
            f'suspect labels: '
            f'{b["suspect_labels"] or "none"}.</p>{chart}{chart_log}'
            '<table id="nc-table"><thead><tr><th>label</th><th>mask</th><th>pattern</th><th>mask × pattern</th>'
            '<th>L1 norm</th><th>anomaly index</th><th>log-scale index</th><th>isolation</th><th>attack success</th>'
            '<th></th>'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table></section>')


def _dl_section(s: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    b = s["dl_tnd"]
    rows = b["per_label"]
    flagged = set(b["suspect_labels"])
    chart = _label_chart(b, "similarity_q25", b["threshold"],
                         f"DL-TND: {b['quantile']:.0%} quantile of cosine similarity", "similarity", "chart-dl-tnd")
    masks = arrays.get("dl_tnd.masks")
    body = []
    for i, r in enumerate(rows):
        lab = int(r["label"])
        img = (_img(png_data_uri(masks[i], scale=3), "dl-mask", lab, f"label {lab} universal mask")
               if masks is not None and i < len(masks) else "")
        flag = '<span class="flag">suspect</span>' if lab in flagged else ""
        body.append(f'<tr class="{"suspect" if lab in flagged else ""}"><td>{lab}</td><td>{img}</td>'
                    f'<td class="num">{_fmt(r["similarity_q25"])}</td>'
                    f'<td class="num">{_fmt(r["similarity_median"])}</td>'
                    f'<td class="num">{_fmt(r["l1_norm"], 1)}</td><td class="num">{_fmt(r["l1_weight"], 3)}</td>'
                    f'<td class="num">{_fmt(r["universal_success"], 2)}</td><td>{flag}</td></tr>')
    return (f'<section id="dl-tnd"><h2>DL-TND (data-limited)</h2><p class="note">{b["samples_per_class"]} clean '
            f'images per class. Per label, a universal sparse perturbation that moves the other classes off their '
            f'labels against per-image perturbations to the label; suspect when the {b["quantile"]:.0%} quantile of '
            f'the cosine similarity of their logits exceeds {b["threshold"]:g}. Decision: <b>{b["decision"]}</b>; '
            f'suspect labels: {b["suspect_labels"] or "none"}.</p>{chart}'
            '<table id="dl-table"><thead><tr><th>label</th><th>universal mask</th><th>similarity q25</th>'
            '<th>median</th><th>L1 norm</th><th>L1 weight</th><th>universal success</th><th></th></tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></section>')


def _df_section(s: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    b = s["df_tnd"]
    rows = b["per_label"]
    flagged = set(b["suspect_labels"])
    chart = _label_chart(b, "dominance", b["threshold"], "DF-TND: logit increase over the runner-up's",
                         "dominance", "chart-df-tnd")
    chart_inc = _label_chart(b, "logit_increase", b["min_increase"], "DF-TND: mean logit increase", "logit increase",
                             "chart-df-tnd-increase")
    imgs = ""
    if "df_tnd.mask" in arrays:
        m, p = arrays["df_tnd.mask"], arrays["df_tnd.pattern"]
        imgs = (f'<p>{_img(png_data_uri(m, scale=3), "df-mask", -1, "DF-TND recovered mask")} '
                f'{_img(png_data_uri(p, scale=3), "df-pattern", -1, "DF-TND recovered pattern")} '
                f'{_img(png_data_uri(m * p, scale=3), "df-trigger", -1, "DF-TND mask × pattern")}</p>')
    body = "".join(f'<tr class="{"suspect" if r["label"] in flagged else ""}"><td>{r["label"]}</td>'
                   f'<td class="num">{_fmt(r["logit_increase"], 2)}</td><td class="num">{_fmt(r.get("dominance"), 2)}'
                   f'</td><td class="num">{_fmt(r["anomaly_index"], 2)}</td>'
                   f'<td>{"<span class=flag>suspect</span>" if r["label"] in flagged else ""}</td></tr>'
                   for r in rows)
    return (f'<section id="df-tnd"><h2>DF-TND (data-free)</h2><p class="note">{b["seeds"]} random-noise seeds; '
            f'the label whose logit rises most is suspect when its increase is at least {b["threshold"]:g} times '
            f"the runner-up's and exceeds {b['min_increase']:g} (bars set on a calibration population of clean "
            f'and backdoored models). Decision: '
            f'<b>{b["decision"]}</b>; suspect labels: {b["suspect_labels"] or "none"}.</p>{chart}{chart_inc}'
            f'{imgs}<table id="df-table"><thead><tr><th>label</th><th>logit increase</th><th>dominance</th>'
            f'<th>anomaly index</th><th></th></tr></thead><tbody>{body}</tbody></table></section>')


def _lead_table(b: dict[str, Any], needed_key: str, grid: list[str], images: list[str]) -> str:
    """The per-label table of a reversal read as a lead (blend, warp): image, need, lead, success curve."""
    flagged = set(b["suspect_labels"])
    body = []
    for i, r in enumerate(b["per_label"]):
        lab = int(r["label"])
        curve = " ".join(f"{r['attack_success'].get(a, 0):.2f}" for a in grid)
        flag = '<span class="flag">suspect</span>' if lab in flagged else ""
        body.append(f'<tr class="{"suspect" if lab in flagged else ""}"><td>{lab}</td>'
                    f'<td>{images[i] if i < len(images) else ""}</td>'
                    f'<td class="num">{_fmt(r[needed_key], 3)}</td><td class="num">{_fmt(r["lead"], 3)}</td>'
                    f'<td class="num">{curve}</td><td>{flag}</td></tr>')
    return "".join(body)


def _blend_section(s: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    b = s["blend"]
    chart = _label_chart(b, "lead", b["threshold"], "Blend reversal: lead over the easiest other label",
                         "lead", "chart-blend")
    patterns = arrays.get("blend.patterns")
    alphas = [f"{a:g}" for a in b["alphas"]]
    images = [] if patterns is None else [
        _img(png_data_uri(p, scale=3), "blend-pattern", int(r["label"]), f'label {r["label"]} blended pattern')
        for p, r in zip(patterns, b["per_label"])]
    body = _lead_table(b, "alpha", alphas, images)
    return (f'<section id="blend"><h2>Blend reversal (whole-image triggers)</h2><p class="note">Per label, a '
            f'whole-image pattern blended into clean images at the opacities {", ".join(alphas)}; the opacity it '
            f'needs for half the images of other classes to go to the label, against the easiest other label. '
            f'Suspect when the label needs at least {b["threshold"]:.1%} less opacity than every other label '
            f'(bar set on a calibration population of clean and backdoored models). Decision: '
            f'<b>{b["decision"]}</b>; suspect labels: {b["suspect_labels"] or "none"}.</p>{chart}'
            '<table id="blend-table"><thead><tr><th>label</th><th>pattern</th><th>opacity needed</th>'
            f'<th>lead</th><th>success at {", ".join(alphas)}</th><th></th></tr></thead>'
            f'<tbody>{body}</tbody></table></section>')


def _warp_section(s: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    b = s["warp"]
    chart = _label_chart(b, "lead", b["threshold"], "Warp reversal: lead over the easiest other label",
                         "lead", "chart-warp")
    fields = arrays.get("warp.fields")
    strengths = [f"{v:g}" for v in b["strengths"]]
    images = []
    if fields is not None:  # each field's displacement length, brightest where it moves the image most
        for f, r in zip(fields, b["per_label"]):
            length = np.sqrt((np.asarray(f, dtype=np.float32) ** 2).sum(0, keepdims=True))
            length = length / max(float(length.max()), 1e-9)
            images.append(_img(png_data_uri(length, scale=3), "warp-field", int(r["label"]),
                               f'label {r["label"]} warp displacement'))
    body = _lead_table(b, "strength", strengths, images)
    src = " (reused from the profile)" if b.get("source") == "profile" else ""
    return (f'<section id="warp"><h2>Warp reversal (warping triggers){src}</h2><p class="note">Per label, a smooth '
            f'displacement field ({b["grid"]}x{b["grid"]} control points) warping clean images, its largest '
            f'displacement bounded at {", ".join(strengths)} pixels; the displacement it needs for half the images '
            f'of other classes to go to the label, against the easiest other label. Suspect when the label needs '
            f'at least {b["threshold"]:.1%} less displacement than every other label. Decision: '
            f'<b>{b["decision"]}</b>; suspect labels: {b["suspect_labels"] or "none"}.</p>{chart}'
            '<table id="warp-table"><thead><tr><th>label</th><th>displacement</th><th>pixels needed</th>'
            f'<th>lead</th><th>success at {", ".join(strengths)}</th><th></th></tr></thead>'
            f'<tbody>{body}</tbody></table></section>')


def render_html(result: AuditResult) -> str:
    """The whole report page as one string (no external references)."""
    s, arrays = result.summary, result.arrays
    bad = s["verdict"] == "backdoored"
    head = ("Backdoor suspected" if bad else "No backdoor found")
    sub = (f"suspect label(s): {', '.join(map(str, s['suspect_labels']))} — {s['rule']}" if bad
           else f"methods run: {', '.join(s['methods'])}")
    method_rows = []
    for key in METHODS.values():
        if key in s:
            b = s[key]
            method_rows.append(f'<tr><td>{b["method"]}</td><td class="{"flag" if b["suspect_labels"] else ""}">'
                               f'{b["decision"]}</td><td>{b["suspect_labels"] or "none"}</td>'
                               f'<td class="num">{_fmt(s["timings"].get(key), 1)} s</td></tr>')
    agree = s["agreement"]
    per_label = "".join(f"<li>label {k}: {', '.join(v)}</li>" for k, v in agree["per_label"].items()) or \
        "<li>no label flagged by any method</li>"
    pairs = "".join(f"<li>{k.replace('~', ' and ')}: {'agree' if v else 'disagree'}</li>"
                    for k, v in agree["model_verdicts_agree"].items())
    data = s["data"]
    prov = [("model SHA-256", f'<code id="sha">{s["model_sha256"]}</code>'),
            ("model file", _fmt(s["source"].get("model_file"))), ("weights", _fmt(s["source"].get("weights"))),
            ("data", "none (data-free)" if data["data_free"] else
             f'{_fmt(data["source"])} — {data["images"]} images, per class {data["per_class"]}'),
            ("input shape", _fmt(s["input_shape"])), ("classes", _fmt(s["num_classes"])),
            ("feature layer", _fmt(s["feature_layer"])), ("seed", _fmt(s["seed"])),
            ("timings (s)", html.escape(", ".join(f"{k} {v}" for k, v in s["timings"].items()))),
            ("created", _fmt(s["created"])),
            ("environment", html.escape(", ".join(f"{k} {v}" for k, v in s["environment"].items())))]
    sections = []
    if "neural_cleanse" in s:
        sections.append(_nc_section(s, arrays))
    if "dl_tnd" in s:
        sections.append(_dl_section(s, arrays))
    if "df_tnd" in s:
        sections.append(_df_section(s, arrays))
    if "blend" in s:
        sections.append(_blend_section(s, arrays))
    if "warp" in s:
        sections.append(_warp_section(s, arrays))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>guard audit: {html.escape(head)}</title><style>{_CSS}</style></head>
<body data-verdict="{s['verdict']}">
<div id="verdict" class="verdict {s['verdict']}">{html.escape(head)}<small>{html.escape(sub)}</small></div>
<main>
<section id="summary"><h2>Methods</h2><table><thead><tr><th>method</th><th>decision</th><th>suspect labels</th>
<th>time</th></tr></thead><tbody>{''.join(method_rows)}</tbody></table>
<h2>Method agreement</h2><ul id="agreement">{per_label}{pairs}</ul>
<p class="note">Verdict rule: backdoored when a method calibrated on clean and backdoored models flags a
label (Neural Cleanse with its isolation bar, DF-TND, the blend reversal, the warp reversal); DL-TND
decides only alone, and otherwise its flags are reported here as agreement
(this audit: {html.escape(s['rule'])}).</p></section>
{''.join(sections)}
<section id="provenance"><h2>Provenance</h2><table>{''.join(f'<tr><th>{k}</th><td>{v}</td></tr>' for k, v in prov)}
</table></section>
</main><script>{_SCRIPT}</script></body></html>
"""


def prepare_out_dir(out: str | Path, *, force: bool = False) -> Path:
    """Refuse an existing non-empty report directory unless ``force``; create it otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"report directory {out} exists and is not empty (pass --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the report from a web server or artefact store
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(result: AuditResult, out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html``; returns both paths."""
    out = prepare_out_dir(out, force=force)
    if force:
        for name in ("report.json", "report.html"):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
    jpath, hpath = out / "report.json", out / "report.html"
    _atomic_write(jpath, json.dumps(result.summary, indent=2, sort_keys=True, default=float) + "\n")
    _atomic_write(hpath, render_html(result))
    return jpath, hpath
