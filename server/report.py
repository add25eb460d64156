"""The federation report: ``report.json`` (architecture.md keys), ``report.md``, ``report.html`` and PNGs.

``report.html`` is ``report.md`` rendered (markdown-it, raw HTML in the text escaped)
into one self-contained file: inline CSS, every figure embedded as a ``data:`` URI,
no reference to anything outside it, so it opens from a file share or an e-mail.

Pooled utility is computed from the sum of the sites' confusion matrices (exact, not
an average of per-site scores); pooled privacy numbers are averages over sites
weighted by each site's number of real records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from plan_shared.metrics import classification_report


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy and QWK of a confusion matrix (rows = truth)."""
    k = cm.shape[0]
    y_true = np.repeat(np.repeat(np.arange(k), k), cm.ravel())
    y_pred = np.repeat(np.tile(np.arange(k), k), cm.ravel())
    return classification_report(y_true, y_pred)


def _confusion(site: dict[str, Any], which: str) -> Optional[np.ndarray]:
    flat = site.get(f"{which}.confusion")
    k = int(site.get("num_classes", 0) or 0)
    if flat is None or k == 0 or len(flat) != k * k:
        return None
    return np.asarray(flat, dtype=np.int64).reshape(k, k)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


PRIVACY_KEYS = ("mia_auc", "mia_tpr_at_1pct_fpr", "loss_mia_auc", "loss_mia_tpr_at_1pct_fpr", "dcr_ratio",
                "too_close_rate")
UTILITY_KEYS = ("accuracy", "balanced_accuracy", "qwk")


def utility_section(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Per site and pooled: phi_down (trained on the pool) and the real reference."""
    out: dict[str, Any] = {"sites": {}}
    sums: dict[str, Optional[np.ndarray]] = {"synthetic": None, "real": None}
    for name, s in sorted(evaluation.get("sites", {}).items()):
        if s.get("status") != "ok":
            out["sites"][name] = {"status": s.get("status"), "reason": s.get("reason")}
            continue
        entry: dict[str, Any] = {}
        for which in ("synthetic", "real"):
            entry[which] = {k: s.get(f"{which}.{k}") for k in UTILITY_KEYS}
            entry[which]["n"] = s.get(f"{which}.n")
            cm = _confusion(s, which)
            if cm is not None:
                entry[which]["confusion"] = cm.tolist()
                sums[which] = cm if sums[which] is None else sums[which] + cm
        out["sites"][name] = entry
    pooled: dict[str, Any] = {}
    for which, cm in sums.items():
        if cm is not None:
            pooled[which] = {**metrics_from_confusion(cm), "n": int(cm.sum()), "confusion": cm.tolist()}
    out["pooled"] = pooled
    # Flat keys for quick reading: pooled phi_down and pooled reference.
    for k in UTILITY_KEYS:
        out[k] = pooled.get("synthetic", {}).get(k)
        out[f"real_{k}"] = pooled.get("real", {}).get(k)
    return out


def privacy_section(evaluation: dict[str, Any]) -> dict[str, Any]:
    sites, acc = {}, {k: [] for k in PRIVACY_KEYS}
    weights = []
    for name, s in sorted(evaluation.get("sites", {}).items()):
        if s.get("status") != "ok":
            continue
        sites[name] = {k: s.get(f"privacy.{k}") for k in PRIVACY_KEYS}
        sites[name]["n_synthetic"] = s.get("privacy.n_synthetic")
        w = float(s.get("privacy.n_members", 1) or 1)
        weights.append(w)
        for k in PRIVACY_KEYS:
            acc[k].append(s.get(f"privacy.{k}"))
    out: dict[str, Any] = {"sites": sites}
    for k, vals in acc.items():
        pairs = [(v, w) for v, w in zip(vals, weights) if v is not None and not math.isnan(v)]
        out[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None
    return out


def build_report(
    *,
    federation: dict[str, Any],
    synthesis: dict[str, Any],
    downstream: dict[str, Any],
    evaluation: dict[str, Any],
    timing: dict[str, float],
    config: dict[str, Any],
    method: str,
    extra: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    sites = sorted(set(synthesis.get("sites", {})) | set(evaluation.get("sites", {})))
    pool = downstream.get("pool", {})
    report = {
        "sites": sites,
        "rounds": federation.get("rounds_done"),
        "method": method,
        "pool": {"n_images": pool.get("n_images"), "n_files": pool.get("n_files"), "per_site": pool.get("per_site", {})},
        "synthesis": synthesis.get("sites", {}),
        "downstream": {k: v for k, v in downstream.items() if k != "pool"},
        "utility": utility_section(evaluation),
        "privacy": privacy_section(evaluation),
        "timing": timing,
        "config": config,
    }
    if extra:
        report.update(extra)
    return _clean(report)


def privacy_utility_plot(points: dict[str, tuple[float, float]], path: Path, title: str = "") -> Path:
    """Utility (accuracy) against membership-inference AUC, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    colors = {"plan": "tab:green", "linear": "tab:blue", "random": "tab:orange", "real": "tab:red"}
    for name, (mia, util) in points.items():
        if mia is None or util is None:
            continue
        ax.scatter([mia], [util], s=60, color=colors.get(name.split()[0], "tab:gray"), label=name, zorder=3)
        ax.annotate(name, (mia, util), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(0.5, color="gray", lw=0.8, ls="--")
    ax.text(0.5, ax.get_ylim()[0], " chance", fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("membership-inference ROC AUC (0.5 = chance; distance from 0.5 = leakage)")
    ax.set_ylabel("test accuracy on real images")
    ax.set_title(title or "privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_markdown(report: dict[str, Any], path: Path, images: dict[str, str]) -> Path:
    """A human report next to report.json; ``images`` maps captions to relative PNG paths."""
    u, p = report["utility"], report["privacy"]
    lines = [
        "# Federation report",
        "",
        f"- sites: {', '.join(report['sites'])}; rounds: {report['rounds']}; exported method: `{report['method']}`",
        f"- pooled images: {report['pool']['n_images']} ({', '.join(f'{k}: {v}' for k, v in sorted(report['pool']['per_site'].items()))})",
        "",
        "## Utility (trained on the pool, tested on each site's real test split)",
        "",
        "| site | acc (synthetic) | bal. acc | QWK | acc (real reference) | bal. acc | QWK |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = dict(u["sites"])
    rows["**pooled**"] = u["pooled"]
    for name, e in rows.items():
        if "synthetic" not in e:
            lines.append(f"| {name} | failed: {str(e.get('reason', '')).replace('|', '/')} ||||||")
            continue
        s, r = e["synthetic"], e.get("real", {})
        lines.append(f"| {name} | {_fmt(s.get('accuracy'))} | {_fmt(s.get('balanced_accuracy'))} | {_fmt(s.get('qwk'))} | "
                     f"{_fmt(r.get('accuracy'))} | {_fmt(r.get('balanced_accuracy'))} | {_fmt(r.get('qwk'))} |")
    lines += [
        "",
        "## Privacy (members = site train, non-members = site test)",
        "",
        "| site | distance-MIA AUC | TPR@1%FPR | loss-MIA AUC (phi_down) | DCR ratio | too-close rate |",
        "|---|---|---|---|---|---|",
    ]
    prow = dict(p["sites"])
    prow["**pooled**"] = p
    for name, e in prow.items():
        lines.append(f"| {name} | {_fmt(e.get('mia_auc'))} | {_fmt(e.get('mia_tpr_at_1pct_fpr'))} | "
                     f"{_fmt(e.get('loss_mia_auc'))} | {_fmt(e.get('dcr_ratio'))} | {_fmt(e.get('too_close_rate'))} |")
    lines += ["", "## Synthesis per site", "", "| site | status | candidates | accepted | planted rejected |",
              "|---|---|---|---|---|"]
    for name, s in sorted(report["synthesis"].items()):
        status = s.get("status", "")
        if s.get("reason"):
            status += ": " + str(s["reason"]).replace("|", "/").replace("\n", " ")
        elif s.get("export-status"):
            status += f" ({s['export-status']})"
        lines.append(f"| {name} | {status} | {s.get('n_candidates', '')} | "
                     f"{s.get('n_accepted', '')} | {s.get('planted_rejected', '')}/{s.get('planted_total', '')} |")
    lines += ["", "## Timing (s)", ""] + [f"- {k}: {_fmt(v, 1)}" for k, v in report["timing"].items()]
    if images:
        lines += ["", "## Figures", ""]
        for caption, rel in images.items():
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


HTML_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;max-width:1100px;
margin:24px auto;padding:0 20px}
h1{font-size:24px} h2{font-size:19px;border-bottom:1px solid #d5d9e0;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#eef1f5} tr:nth-child(even) td{background:#fafbfc}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f5;padding:0 3px;border-radius:3px}
img{max-width:100%;border:1px solid #d5d9e0}
.missing{color:#b00020}
"""


def _embed(src: str, base: Path) -> Optional[str]:
    """``src`` (relative to ``base``) as a ``data:`` URI, or None when it is not a file under ``base``."""
    import base64
    import mimetypes

    root = base.resolve()
    try:
        target = (root / src).resolve()
    except (OSError, ValueError):
        return None
    if root not in target.parents or not target.is_file():
        return None
    mime = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(target.read_bytes()).decode('ascii')}"


def write_html(markdown: str, path: Path, base: Path, title: str = "Federation report") -> Path:
    """``markdown`` as one self-contained HTML file; images are read from ``base`` and embedded.

    An image that is not a file under ``base`` becomes a visible note, never a link.
    """
    import html

    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    tokens = md.parse(markdown)
    for tok in tokens:
        for child in tok.children or []:
            if child.type == "image":
                src = str(child.attrGet("src") or "")
                uri = _embed(src, base)
                if uri is None:
                    child.type, child.tag, child.attrs = "html_inline", "", {}
                    child.content = f'<span class="missing">[figure missing: {html.escape(src)}]</span>'
                    child.children = None
                else:
                    child.attrSet("src", uri)
            elif child.type == "link_open":
                child.attrSet("href", "#")  # the report has no links; keep it that way
    body = md.renderer.render(tokens, md.options, {})
    doc = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f"<title>{html.escape(title)}</title>\n<style>{HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path


def write_report(report: dict[str, Any], out: Path, images: dict[str, str]) -> tuple[Path, Path]:
    """``report.json``, ``report.md`` and ``report.html`` (the markdown, self-contained) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rj = out / "report.json"
    rj.write_text(json.dumps(report, indent=1))
    md = write_markdown(report, out / "report.md", images)
    write_html(md.read_text(), out / "report.html", out)
    return rj, md
