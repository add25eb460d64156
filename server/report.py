"""The federation report: ``report.json`` (architecture.md keys), ``report.md`` and PNGs.

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


def training_curve_plot(metrics_path: Path, path: Path) -> Optional[Path]:
    """Per-round curves of the federated GAN from ``metrics.jsonl`` (None when it has no rounds).

    Top: FD of G_ema where a round records one (``watch.fd``), else D's logit gap
    real - fake (a gap still growing at the last round says D wins: more rounds alone will
    not help, a flat low gap with falling FD says they would). Bottom: D and G losses.
    """
    rows = []
    for i, line in enumerate(Path(metrics_path).read_text().splitlines() if Path(metrics_path).is_file() else []):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{metrics_path}: line {i + 1} is not JSON ({err})") from None
        w = rec.get("watch") or rec.get("aggregate") or {}
        if "round" in rec:
            rows.append((int(rec["round"]), w))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r, _ in rows]

    def series(key: str) -> list[float]:
        return [float(w[key]) if key in w else math.nan for _, w in rows]

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 5), dpi=120, sharex=True)
    if any("fd" in w for _, w in rows):
        ax.plot(rounds, series("fd"), "o-", color="tab:purple", label="FD of G_ema (lower = closer to real)")
        ax.set_ylabel("FD")
    else:
        gap = [float(w["d_real"]) - float(w["d_fake"]) if "d_real" in w and "d_fake" in w else math.nan for _, w in rows]
        ax.plot(rounds, series("d_real"), ".-", color="tab:green", label="D logit on real")
        ax.plot(rounds, series("d_fake"), ".-", color="tab:orange", label="D logit on generated")
        ax.plot(rounds, gap, "o-", color="tab:red", label="gap real - generated")
        ax.axhline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("D logit (mean over local steps)")
    ax.set_title("federated GAN per round")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    ax2.plot(rounds, series("loss_d"), ".-", color="tab:blue", label="D loss")
    ax2.plot(rounds, series("loss_g"), ".-", color="tab:brown", label="G loss")
    ax2.set_xlabel("round")
    ax2.set_ylabel("loss")
    ax2.legend(fontsize=7, loc="best")
    ax2.grid(alpha=0.3)
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


def write_report(report: dict[str, Any], out: Path, images: dict[str, str]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rj = out / "report.json"
    rj.write_text(json.dumps(report, indent=1))
    return rj, write_markdown(report, out / "report.md", images)
