"""The federation report: ``report.json`` (architecture.md keys), ``report.md``, ``report.html`` and PNGs.

``report.html`` is ``report.md`` rendered (markdown-it, raw HTML in the text escaped)
into one self-contained file: inline CSS, every figure embedded as a ``data:`` URI,
no reference to anything outside it, so it opens from a file share or an e-mail.

Pooled utility is computed from the sum of the sites' confusion matrices (exact, not
an average of per-site scores); pooled privacy numbers are averages over sites
weighted by each site's number of real records. The pooled distance-MIA interval
combines the sites' bootstrap intervals (standard error = interval width / 3.92 per
site, weighted like the AUC, normal approximation): scores never leave a site, so
the pooled AUC is the site-stratified attack's AUC, not one ROC over pooled scores.

References are named for what they are: "site alone" = the same recipe trained on
the site's own real train split. No table or plot puts two recipes' real references
side by side.

``utility.recipes`` (:func:`recipes_section`): per downstream recipe, the pool-trained
model next to the same recipe's real references (site alone, federated real, central
real), pooled over the sites' test splits from summed confusion matrices, and the ratios
pool / reference of accuracy and kappa (Cohen's kappa with quadratic weights, sklearn;
for two classes it equals the unweighted kappa).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from plan_shared.files import atomic_write
from plan_shared.metrics import classification_report
from plan_shared.protocol import (
    REFERENCES,
    ClassifierScore,
    ReferenceEvaluation,
    SiteEvaluation,
    SynthesisSummary,
    pool_seed_index,
)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """accuracy, balanced accuracy and QWK of a confusion matrix (rows = truth)."""
    k = cm.shape[0]
    y_true = np.repeat(np.repeat(np.arange(k), k), cm.ravel())
    y_pred = np.repeat(np.tile(np.arange(k), k), cm.ravel())
    return classification_report(y_true, y_pred)


@dataclass(frozen=True)
class SiteFailure:
    """A site that did not complete a phase: the message of its failure, and the full text."""

    node_id: int | None
    reason: str
    detail: str

    def as_dict(self, with_node: bool = True) -> dict[str, Any]:
        head: dict[str, Any] = {"status": "failed"}
        if with_node:
            head["node_id"] = self.node_id
        return {**head, "reason": self.reason, "detail": self.detail}


T = TypeVar("T")


@dataclass
class PhaseResult(Generic[T]):
    """One post-training phase over the sites: each site's reply or failure, by site name."""

    sites: dict[str, T | SiteFailure] = field(default_factory=dict)
    node_ids: dict[str, int | None] = field(default_factory=dict)
    wall_s: float = 0.0

    def add(self, name: str, node_id: int | None, entry: T | SiteFailure) -> None:
        self.sites[name], self.node_ids[name] = entry, node_id

    def ok(self) -> dict[str, T]:
        return {n: e for n, e in self.sites.items() if not isinstance(e, SiteFailure)}


def synthesis_entry(summary: SynthesisSummary, node_id: int | None) -> dict[str, Any]:
    """A site's synthesis figures as ``synthesis.json`` and ``report.json`` show them (flat keys)."""
    e: dict[str, Any] = {"status": "ok", "node_id": node_id}
    e.update({k: getattr(summary, k) for k in ("n_candidates", "n_accepted", "planted_total", "planted_rejected",
                                               "tau_id", "delta", "num_classes")})
    for m, sec in summary.compare.items():
        e.update({f"compare.{m}.{k}": v for k, v in sec.items()})
    for m, st in summary.methods.items():
        e.update({f"{m}.{k}": v for k, v in st.items()})
    e.update({f"utility.{name}.accuracy": v for name, v in summary.utility.items()})
    e["synthesis_s"] = summary.synthesis_s
    e.update({f"timing.{k}": v for k, v in summary.timing.items()})
    e.update({"site-id": summary.site_id, "bundle-id": summary.bundle_id, "export-status": summary.export_status})
    if summary.method:  # autoexport: the method this site exported and why (synthesis.method auto: its verdict)
        e.update({"method": summary.method, "method_reason": summary.method_reason})
    return e


def synthesis_json(res: PhaseResult[SynthesisSummary], encoder: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``synthesis.json``: every site's entry (failures with their reason), the phase's wall time and,
    when given, what the coordinator did about the inversion encoder (trained, loaded, its cost)."""
    sites = {n: e.as_dict() if isinstance(e, SiteFailure) else synthesis_entry(e, res.node_ids.get(n))
             for n, e in res.sites.items()}
    out: dict[str, Any] = {"sites": sites, "wall_s": res.wall_s}
    if encoder:
        out["encoder"] = dict(encoder)
    return out


def evaluation_json(res: PhaseResult[SiteEvaluation]) -> dict[str, Any]:
    """``evaluation.json``: every site's scores, confusion matrices and audit, or its failure."""
    return {"sites": {n: e.as_dict(with_node=False) if isinstance(e, SiteFailure) else e.as_dict()
                      for n, e in res.sites.items()}, "wall_s": res.wall_s}


REFERENCE_LABELS = {
    "pool": "pool (synthetic)",
    "site_alone": "site alone (own real train split)",
    "federated_real": "federated real (FedAvg over the sites' real train splits)",
    "central_real": "central real (all sites' real train splits pooled; simulation only)",
}
RATIO_KEYS = {"accuracy": "accuracy", "kappa": "qwk"}


def references_json(res: PhaseResult[ReferenceEvaluation]) -> dict[str, Any]:
    """``references.json``: every site's scores per recipe and reference, or its failure."""
    sites: dict[str, Any] = {}
    for n, e in res.sites.items():
        if isinstance(e, SiteFailure):
            sites[n] = e.as_dict(with_node=False)
            continue
        by: dict[str, dict[str, Any]] = {}
        for (recipe, ref), sc in sorted(e.scores.items()):
            by.setdefault(recipe, {})[ref] = sc.as_dict()
        sites[n] = {"status": "ok", "site_id": e.site_id, "evaluate_s": e.evaluate_s, "recipes": by}
    return {"sites": sites, "wall_s": res.wall_s}


def recipes_section(res: PhaseResult[ReferenceEvaluation],
                    evaluation: PhaseResult[SiteEvaluation] | None = None) -> dict[str, Any]:
    """Per recipe and reference: pooled scores over the sites (summed confusion matrices), each site's, and the
    ratios pool / reference (``ratio_pool_over[reference][accuracy|kappa]``).

    phi_down's *site alone* is the evaluation phase's real reference (``SiteEvaluation.real``)
    where the references phase did not score one (client/fedreal.py does not train it twice).
    """
    sums: dict[str, dict[str, np.ndarray]] = {}
    per_site: dict[str, dict[str, dict[str, Any]]] = {}
    for name, e in sorted(res.ok().items()):
        scored = dict(e.scores)
        ev = evaluation.ok().get(name) if evaluation is not None else None
        if ev is not None and any(r == "phi_down" for r, _ in scored):
            scored.setdefault(("phi_down", "site_alone"), ev.real)
        for (recipe, ref), sc in scored.items():
            prev = sums.setdefault(recipe, {}).get(ref)
            sums[recipe][ref] = sc.confusion if prev is None else prev + sc.confusion
            per_site.setdefault(recipe, {}).setdefault(ref, {})[name] = {"accuracy": sc.accuracy, "kappa": sc.qwk,
                                                                          "n": sc.n}
    out: dict[str, Any] = {}
    for recipe, refs in sums.items():
        entry: dict[str, Any] = {}
        for ref in REFERENCES:
            if ref in refs:
                m = metrics_from_confusion(refs[ref])
                entry[ref] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                              "kappa": m["qwk"], "n": int(refs[ref].sum()), "sites": per_site[recipe][ref]}
        seeds = {ref: metrics_from_confusion(cm) for ref, cm in refs.items() if (pool_seed_index(ref) or 0) > 0}
        for ref, m in sorted(seeds.items(), key=lambda kv: pool_seed_index(kv[0]) or 0):
            entry[ref] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "kappa": m["qwk"],
                          "n": int(refs[ref].sum()), "sites": per_site[recipe][ref]}
        pool = entry.get("pool", {})
        entry["ratio_pool_over"] = {
            ref: {k: (pool[k] / e[k] if pool.get(k) is not None and e.get(k) not in (None, 0) else None)
                  for k in RATIO_KEYS}
            for ref, e in entry.items() if pool_seed_index(ref) is None and pool}
        if seeds and pool:
            entry["pool_seeds"] = seed_summary(entry)
        out[recipe] = entry
    failed = {n: e.reason for n, e in res.sites.items() if isinstance(e, SiteFailure)}
    return {"references": REFERENCE_LABELS, "kappa": "Cohen's kappa, quadratic weights (sklearn cohen_kappa_score)",
            "by_recipe": out, **({"failed": failed} if failed else {})}


def seed_summary(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Pooled accuracy and kappa of the pool models trained with different seeds (``pool``, ``pool_s1``, ...):
    mean, sample sd, min and max, and the mean over each real reference of the same recipe."""
    refs = sorted((r for r in entry if pool_seed_index(r) is not None), key=lambda r: pool_seed_index(r) or 0)
    out: dict[str, Any] = {"n_seeds": len(refs), "references": refs}
    for key in RATIO_KEYS:
        vals = [float(entry[r][key]) for r in refs if entry[r].get(key) is not None]
        if not vals:
            continue
        mean = float(np.mean(vals))
        out[key] = {"values": vals, "mean": mean, "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    "min": min(vals), "max": max(vals)}
        out[key]["mean_over"] = {ref: (mean / e[key] if e.get(key) not in (None, 0) else None)
                                 for ref, e in entry.items()
                                 if ref in REFERENCES and ref != "pool" and isinstance(e, Mapping) and key in e}
    return out


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


PRIVACY_KEYS = ("mia_auc", "mia_auc_lo", "mia_auc_hi", "mia_auc_gap", "mia_tpr_at_1pct_fpr",
                "mia_val_auc", "mia_val_auc_lo", "mia_val_auc_hi", "mia_val_auc_gap", "mia_val_tpr_at_1pct_fpr",
                "loss_mia_auc", "loss_mia_tpr_at_1pct_fpr", "dcr_ratio", "too_close_rate",
                "mia_tpr_lo", "mia_tpr_hi", "mia_tpr_chance", "mia_tpr_chance_hi",
                "mia_val_tpr_lo", "mia_val_tpr_hi", "mia_val_tpr_chance", "mia_val_tpr_chance_hi")
# Per site only: a weighted mean of the sites' bootstrap bounds or chance quantiles is no bound of anything.
SITE_ONLY_KEYS = frozenset(k for k in PRIVACY_KEYS if k.endswith(("_tpr_lo", "_tpr_hi", "_tpr_chance_hi")))
# The distance MIA twice: non-members = the site's test split (``mia``) and = its val split (``mia_val``).
# MedMNIST's test split is not drawn from the source of train and val: a pool of OTHER sites' real
# test images, which knows nothing of this site's members, scores 0.40-0.50 against test non-members
# on the demo partition (benchmarks/mia_ablation.py), so only ``mia_val`` isolates membership.
MIA_PREFIXES = ("mia", "mia_val")
Z95 = 1.959963984540054
UTILITY_KEYS = ("accuracy", "balanced_accuracy", "qwk")


def utility_section(evaluation: PhaseResult[SiteEvaluation]) -> dict[str, Any]:
    """Per site and pooled: phi_down (trained on the pool) and the real reference."""
    out: dict[str, Any] = {"sites": {}}
    sums: dict[str, np.ndarray | None] = {"synthetic": None, "real": None}
    for name, s in sorted(evaluation.sites.items()):
        if isinstance(s, SiteFailure):
            out["sites"][name] = {"status": "failed", "reason": s.reason}
            continue
        entry: dict[str, Any] = {}
        for which in SiteEvaluation.SCORED:
            sc: ClassifierScore = getattr(s, which)
            cm = sc.confusion
            entry[which] = {**{k: getattr(sc, k) for k in UTILITY_KEYS}, "n": sc.n, "confusion": cm.tolist()}
            prev = sums[which]
            sums[which] = cm if prev is None else prev + cm
        out["sites"][name] = entry
    pooled: dict[str, Any] = {}
    for which, total in sums.items():
        if total is not None:
            pooled[which] = {**metrics_from_confusion(total), "n": int(total.sum()), "confusion": total.tolist()}
    out["pooled"] = pooled
    # Flat keys for quick reading: pooled phi_down and pooled reference.
    for k in UTILITY_KEYS:
        out[k] = pooled.get("synthetic", {}).get(k)
        out[f"real_{k}"] = pooled.get("real", {}).get(k)
    return out


def privacy_section(evaluation: PhaseResult[SiteEvaluation]) -> dict[str, Any]:
    sites: dict[str, dict[str, Any]] = {}
    acc: dict[str, list[float | None]] = {k: [] for k in PRIVACY_KEYS}
    weights = []
    for name, s in sorted(evaluation.ok().items()):
        sites[name] = {k: s.privacy.get(k) for k in PRIVACY_KEYS}
        sites[name]["n_synthetic"] = s.privacy.get("n_synthetic")
        w = float(s.privacy.get("n_members", 1) or 1)
        weights.append(w)
        for k in PRIVACY_KEYS:
            acc[k].append(s.privacy.get(k))
    out: dict[str, Any] = {"sites": sites}
    for k, vals in acc.items():
        if k in SITE_ONLY_KEYS:
            continue
        pairs = [(v, w) for v, w in zip(vals, weights) if v is not None and not math.isnan(v)]
        out[k] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None
    for prefix in MIA_PREFIXES:
        out.update(pooled_auc_interval(sites, weights, prefix))
    return out


def pooled_auc_interval(sites: dict[str, dict[str, Any]], weights: list[float],
                        prefix: str = "mia") -> dict[str, float | None]:
    """Pooled distance-MIA AUC, |AUC - 0.5| and 95 % interval from the sites' AUCs and bootstrap intervals.

    ``prefix`` picks the attack: ``mia`` (non-members = test) or ``mia_val`` (non-members = val).
    """
    k_auc, k_lo, k_hi, k_gap = (f"{prefix}_auc", f"{prefix}_auc_lo", f"{prefix}_auc_hi", f"{prefix}_auc_gap")
    rows = []
    for (_name, e), w in zip(sites.items(), weights):
        a, lo, hi = e.get(k_auc), e.get(k_lo), e.get(k_hi)
        if a is None or math.isnan(a):
            continue
        se = (hi - lo) / (2 * Z95) if lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi)) else None
        rows.append((a, se, w))
    if not rows:
        return {k_auc: None, k_lo: None, k_hi: None, k_gap: None}
    wsum = sum(w for _, _, w in rows)
    auc = sum(a * w for a, _, w in rows) / wsum
    out: dict[str, float | None] = {k_auc: auc, k_gap: abs(auc - 0.5), k_lo: None, k_hi: None}
    if all(se is not None for _, se, _ in rows):
        se = math.sqrt(sum((w / wsum) ** 2 * float(se_i) ** 2 for _, se_i, w in rows if se_i is not None))
        out[k_lo], out[k_hi] = auc - Z95 * se, auc + Z95 * se
    return out


def build_report(
    *,
    federation: dict[str, Any],
    synthesis: PhaseResult[SynthesisSummary],
    downstream: dict[str, Any],
    evaluation: PhaseResult[SiteEvaluation],
    timing: dict[str, float],
    config: dict[str, Any],
    method: str,
    extra: dict[str, Any] | None = None,
    references: PhaseResult[ReferenceEvaluation] | None = None,
) -> dict[str, Any]:
    sites = sorted(set(synthesis.sites) | set(evaluation.sites))
    pool = downstream.get("pool", {})
    report = {
        "sites": sites,
        "rounds": federation.get("rounds_done"),
        "method": method,
        "pool": {"n_images": pool.get("n_images"), "n_files": pool.get("n_files"), "per_site": pool.get("per_site", {})},
        "synthesis": synthesis_json(synthesis)["sites"],
        "downstream": {k: v for k, v in downstream.items() if k != "pool"},
        "utility": utility_section(evaluation),
        "privacy": privacy_section(evaluation),
        "timing": timing,
        "config": config,
    }
    if references is not None:
        report["utility"]["recipes"] = recipes_section(references, evaluation)
    if extra:
        report.update(extra)
    return _clean(report)


REFERENCE_STYLES = (("tab:red", "-"), ("tab:purple", "-."), ("black", ":"))


def privacy_utility_plot(points: dict[str, Any], path: Path, title: str = "",
                         references: dict[str, dict[str, float]] | None = None) -> Path:
    """Utility (accuracy) against membership-inference AUC.

    ``references``: ``{panel title: {label: accuracy}}``: the same recipe trained on real data
    (site alone, federated real, central real), drawn as labelled horizontal lines in that
    panel (a model trained on the real images has no pool to attack, so no x position).

    ``points``: ``{panel title: {label: (mia_auc, accuracy[, auc_lo, auc_hi])}}``, one panel per
    training recipe, so that every point in a panel (the real reference "site alone"
    included) was trained with the same recipe; a flat ``{label: (mia, acc)}`` is one panel.
    The interval, where given, is drawn as a horizontal error bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if points and all(isinstance(v, (tuple, list)) for v in points.values()):
        points = {title or "privacy vs utility": points}
    refs = references or {}
    panels = {t: p for t, p in points.items() if p or refs.get(t)}
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 5.6), dpi=120, squeeze=False, layout="constrained")
    colors = {"plan": "tab:green", "linear": "tab:blue", "random": "tab:orange", "site": "tab:red"}
    for ax, (ptitle, pts) in zip(axes[0], panels.items()):
        for name, v in pts.items():
            mia, util = v[0], v[1]
            if mia is None or util is None:
                continue
            color = colors.get(name.split()[0], "tab:gray")
            lo, hi = (v[2], v[3]) if len(v) >= 4 else (None, None)
            if lo is not None and hi is not None:
                ax.errorbar([mia], [util], xerr=[[mia - lo], [hi - mia]], fmt="none", ecolor=color, capsize=3, zorder=2)
            ax.scatter([mia], [util], s=60, color=color, label=name, zorder=3)
            ax.annotate(name, (mia, util), textcoords="offset points", xytext=(6, 4), fontsize=7)
        for (label, acc), (color, ls) in zip(refs.get(ptitle, {}).items(), REFERENCE_STYLES):
            if acc is not None:
                ax.axhline(acc, color=color, lw=1.2, ls=ls, label=f"{label}: {acc:.3f}", zorder=1)
        ax.axvline(0.5, color="gray", lw=0.8, ls="--", label="chance (0.5)")
        ax.set_xlabel("distance membership-inference ROC AUC, non-members = val\n(0.5 = chance; |AUC - 0.5| = leakage)", fontsize=8)
        ax.set_ylabel("accuracy on the sites' real test splits", fontsize=8)
        ax.set_title(ptitle, fontsize=8, wrap=True)
        ax.margins(x=0.15, y=0.12)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=1, frameon=False)
    if title and len(panels) > 1:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curve_plot(metrics_path: Path, path: Path) -> Path | None:
    """Per-round curves of the federated GAN from ``metrics.jsonl`` (None when it has no rounds).

    Top: FD of G_ema where a round records one (``watch.fd``, gan.watch_fd_samples: the sites'
    FD of the global model they received, i.e. round r scores the model after round r-1), else D's logit gap
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
    from matplotlib.ticker import MaxNLocator

    rounds = [r for r, _ in rows]

    def series(key: str) -> list[float]:
        return [float(w[key]) if key in w else math.nan for _, w in rows]

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 5), dpi=120, sharex=True)
    if any("fd" in w for _, w in rows):
        ax.plot(rounds, series("fd"), "o-", color="tab:purple",
                label="FD of the global G_ema the round starts from\n(sites' mean; lower = closer to their images)")
        fds = [v for v in series("fd") if math.isfinite(v)]
        if fds and min(fds) > 0 and max(fds) / min(fds) > 20:  # the untrained round-1 G would flatten the rest
            ax.set_yscale("log")
            ax.set_ylabel("FD (fixed random-feature space, log)")
        else:
            ax.set_ylabel("FD (fixed random-feature space)")
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
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole rounds (the 4-round demo had ticks at 1.5, 2.5)
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


def exported_methods(report: dict[str, Any]) -> str:
    """autoexport: `` (per site: site-0 random, ...)`` where the sites stated the method they exported."""
    per = {n: s["method"] for n, s in sorted(report.get("synthesis", {}).items()) if s.get("method")}
    return f" (per site: {', '.join(f'{n} {m}' for n, m in per.items())})" if per else ""


def write_markdown(report: dict[str, Any], path: Path, images: dict[str, str]) -> Path:
    """A human report next to report.json; ``images`` maps captions to relative PNG paths."""
    u, p = report["utility"], report["privacy"]
    lines = [
        "# Federation report",
        "",
        f"- sites: {', '.join(report['sites'])}; rounds: {report['rounds']}; exported method: `{report['method']}`"
        + exported_methods(report),
        f"- pooled images: {report['pool']['n_images']} ({', '.join(f'{k}: {v}' for k, v in sorted(report['pool']['per_site'].items()))})",
        "",
        "## Utility (trained on the pool, tested on each site's real test split)",
        "",
        "Reference *site alone*: the same recipe as phi_down (architecture, epochs, class-balanced sampling) "
        "trained on the site's own real train split, epoch chosen on its real val split.",
        "",
        "| site | acc (phi_down, pool) | bal. acc | QWK | acc (site alone) | bal. acc | QWK |",
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
    lines += recipes_markdown(u.get("recipes"))
    lines += [
        "",
        "## Privacy (members = site train)",
        "",
        "Distance MIA: score = minus a real image's pixel distance to the closest exported image. Chance is 0.5 from "
        "both sides (an attacker can flip the score), so |AUC - 0.5| is the leakage; 95 % bootstrap interval per site, "
        "pooled interval combined from the sites'. Non-members are the site's val split (drawn from the source of the "
        "train split: this isolates membership) and, second, its test split (MedMNIST's official test split, which "
        "differs from train: other sites' real test images, which know nothing of this site's members, score 0.40-0.50 "
        "against it on the demo partition). TPR@1%FPR per site with its 95 % bootstrap interval and, after 'chance', "
        "the TPR that members no closer than non-members exceed one time in twenty at that many non-members "
        "(with ~90 val images a site's TPR is set by its single closest non-member).",
        "",
        "| site | AUC vs val [95 % CI] | \\|AUC - 0.5\\| | TPR@1%FPR | AUC vs test [95 % CI] | TPR@1%FPR | "
        "loss-MIA AUC (phi_down) | DCR ratio | too-close rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    prow = dict(p["sites"])
    prow["**pooled**"] = p

    def auc_ci(e: dict[str, Any], prefix: str) -> str:
        lo, hi = e.get(f"{prefix}_auc_lo"), e.get(f"{prefix}_auc_hi")
        ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else ""
        return f"{_fmt(e.get(f'{prefix}_auc'))}{ci}"

    def tpr_ci(e: dict[str, Any], prefix: str) -> str:
        lo, hi, ch = e.get(f"{prefix}_tpr_lo"), e.get(f"{prefix}_tpr_hi"), e.get(f"{prefix}_tpr_chance_hi")
        ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else ""
        return f"{_fmt(e.get(f'{prefix}_tpr_at_1pct_fpr'))}{ci}" + (f" (chance {_fmt(ch)})" if ch is not None else "")

    for name, e in prow.items():
        lines.append(f"| {name} | {auc_ci(e, 'mia_val')} | {_fmt(e.get('mia_val_auc_gap'))} | "
                     f"{tpr_ci(e, 'mia_val')} | {auc_ci(e, 'mia')} | {tpr_ci(e, 'mia')} | "
                     f"{_fmt(e.get('loss_mia_auc'))} | {_fmt(e.get('dcr_ratio'))} | {_fmt(e.get('too_close_rate'))} |")
    lines += ["", "## Synthesis per site", "",
              "| site | status | method exported | candidates | accepted | planted rejected |",
              "|---|---|---|---|---|---|"]
    for name, s in sorted(report["synthesis"].items()):
        status = s.get("status", "")
        if s.get("reason"):
            status += ": " + str(s["reason"]).replace("|", "/").replace("\n", " ")
        elif s.get("export-status"):
            status += f" ({s['export-status']})"
        lines.append(f"| {name} | {status} | {s.get('method', '')} | {s.get('n_candidates', '')} | "
                     f"{s.get('n_accepted', '')} | {s.get('planted_rejected', '')}/{s.get('planted_total', '')} |")
    lines += ["", "## Timing (s)", ""] + [f"- {k}: {_fmt(v, 1)}" for k, v in report["timing"].items()]
    if images:
        lines += ["", "## Figures", ""]
        for caption, rel in images.items():
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    path.write_text("\n".join(lines) + "\n")
    return path


def recipes_markdown(sec: dict[str, Any] | None) -> list[str]:
    """The per-recipe utility table: pool vs site alone vs federated real vs central real, and the ratios."""
    if not sec or not sec.get("by_recipe"):
        return []
    lines = ["", "## Utility per downstream recipe, against the same recipe on real data", "",
             "Pooled over the sites' real test splits. References: "
             + "; ".join(f"*{v}*" for k, v in sec["references"].items() if k != "pool")
             + f". Kappa: {sec['kappa']}. Ratio = pool / reference.", "",
             "| recipe | trained on | accuracy | kappa | balanced acc. | n | pool/ref acc. | pool/ref kappa |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, entry in sec["by_recipe"].items():
        for ref, label in sec["references"].items():
            e = entry.get(ref)
            if e is None:
                continue
            ratio = entry.get("ratio_pool_over", {}).get(ref, {})
            lines.append(f"| {recipe} | {label} | {_fmt(e.get('accuracy'))} | {_fmt(e.get('kappa'))} | "
                         f"{_fmt(e.get('balanced_accuracy'))} | {e.get('n')} | {_fmt(ratio.get('accuracy'))} | "
                         f"{_fmt(ratio.get('kappa'))} |")
    for recipe, entry in sec["by_recipe"].items():
        ps = entry.get("pool_seeds")
        if not ps or "accuracy" not in ps:
            continue
        a, kp = ps["accuracy"], ps.get("kappa", {})
        over = "; ".join(f"{ref} x{_fmt(a['mean_over'][ref])} acc., x{_fmt(kp.get('mean_over', {}).get(ref))} kappa"
                         for ref in a.get("mean_over", {}) if a["mean_over"][ref] is not None)
        lines.append(f"\n- {recipe} on the pool over {ps['n_seeds']} training seeds: accuracy {_fmt(a['mean'])} "
                     f"(sd {_fmt(a['sd'])}, {_fmt(a['min'])}-{_fmt(a['max'])}), kappa {_fmt(kp.get('mean'))} "
                     f"(sd {_fmt(kp.get('sd'))}); mean / reference: {over or 'n/a'}")
    for n, why in (sec.get("failed") or {}).items():
        lines.append(f"\n- site {n} failed the references phase: {str(why).replace('|', '/')}")
    return lines


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


def _embed(src: str, base: Path) -> str | None:
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
    atomic_write(path, doc)  # plumbing: plan_shared.files
    return path


def write_report(report: dict[str, Any], out: Path, images: dict[str, str]) -> tuple[Path, Path]:
    """``report.json``, ``report.md`` and ``report.html`` (the markdown, self-contained) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rj = out / "report.json"
    rj.write_text(json.dumps(report, indent=1))
    md = write_markdown(report, out / "report.md", images)
    write_html(md.read_text(), out / "report.html", out)
    return rj, md
