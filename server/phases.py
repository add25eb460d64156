"""Coordinator phases after federated GAN training (issue 6).

Before a: when ``pool.policy_file`` is set, the final G_ema's weights digest (and the
   image shape and classes the sites describe) is written into the pool's policy file
   (:func:`publish_final_generator`); the pool refuses bundles of any other generator.
a. ``synthesize``: a ``query.synthesize`` message with the final G_ema weights to every
   site; each runs the PLAN pipeline, exports its bundle to the pool and answers with
   numbers. A site that fails is recorded with its reason; the others go on.
b. ``downstream``: pull the pool (reader credentials) into ``OUT/pool`` and train phi_down.
c+d. ``evaluate``: a ``query.evaluate`` message with phi_down's weights; each site
   scores it on its real test split next to a real-data reference, and audits its
   exported images and phi_down for membership leakage.

Only weights, counts and metrics cross Flower; images cross only through the pool.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from plan_shared.config import METHODS, PlanConfig
from plan_shared.credentials import find_identity_dir
from plan_shared.pool_transport import RetryPolicy

LOG = logging.getLogger("plan.phases")


class PhaseError(RuntimeError):
    """A post-training phase cannot go on (no site synthesised, empty pool, ...)."""


def _reader_credentials(cfg: PlanConfig) -> Path:
    # plumbing: the one credentials-folder rule (plan_shared.credentials.find_identity_dir)
    found = find_identity_dir(cfg.federation.certs_dir, "reader", explicit=cfg.pool.credentials)
    if found is None:
        raise PhaseError(
            f"no reader credentials to pull the pool: set pool.credentials or run "
            f"`plan-server certs issue --dir CERTS --name coordinator --role reader --out {cfg.federation.certs_dir}/readers/coordinator`"
        )
    return found


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str, limit: int = 400) -> str:
    """The message of a remote failure without the (Ray/Flower) traceback around it."""
    text = _ANSI.sub("", reason or "").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Message:" in ln:
            ln = ln.split("Message:", 1)[1].strip()
            return (ln[:limit].rstrip("'>").strip()) or text[:limit]
    return (lines[-1] if lines else text)[:limit]


def _metrics(reply: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in reply.content.metric_records.values():
        out.update(dict(rec))
    return out


def _configs(reply: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rec in reply.content.config_records.values():
        out.update(dict(rec))
    return out


class Phases:
    """Runs phases a-d over the nodes of a Grid; every result is also written to ``out``."""

    def __init__(self, grid: Grid, cfg: PlanConfig, out: Path, site_names: dict[int, str], timeout_s: float):
        self.grid, self.cfg, self.out = grid, cfg, Path(out)
        self.site_names = site_names
        self.timeout_s = timeout_s

    def _send(self, node_ids: list[int], kind: str, content: RecordDict,
              timeout_s: Optional[float] = None) -> tuple[dict[int, Message], dict[int, str]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        msgs = [Message(content, message_type=f"{MessageType.QUERY}.{kind}", dst_node_id=nid) for nid in node_ids]
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout_s))
        ok, failed = {}, {}
        for r in replies:
            nid = r.metadata.src_node_id
            if r.has_error():
                failed[nid] = r.error.reason
            else:
                ok[nid] = r
        for nid in node_ids:
            if nid not in ok and nid not in failed:
                failed[nid] = f"no reply within {timeout_s:.0f}s"
        return ok, failed

    def _name(self, nid: int, reply: Optional[Message] = None) -> str:
        if reply is not None and "site" in reply.content.config_records:
            self.site_names[nid] = str(reply.content["site"]["site-id"])
        return self.site_names.get(nid, f"node-{nid}")

    # ------------------------------------------------------------------ before a. the pool's policy
    def num_classes(self, node_ids: list[int]) -> Optional[int]:
        """The federation's number of classes, as the sites describe their data (None: no site answered)."""
        conf = ConfigRecord({"plan-config": json.dumps(self.cfg.to_dict())})
        # A describe is quick (the site loads its data); a dead site must not cost a whole round timeout here.
        ok, failed = self._send(node_ids, "describe", RecordDict({"config": conf}), timeout_s=min(self.timeout_s, 120.0))
        for nid, reason in failed.items():
            LOG.warning("site %s did not describe its classes: %s", self._name(nid), short_reason(reason))
        counts = [int(r.content["site"]["num-classes"]) for r in ok.values()
                  if "num-classes" in r.content["site"]]
        return max(counts) if counts else None

    # ------------------------------------------------------------------ a. synthesis
    def synthesize(self, node_ids: list[int], g_ema: dict, channels: int, size: int, generator_round: int,
                   method: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        conf = ConfigRecord({
            "plan-config": json.dumps(self.cfg.to_dict()),
            "channels": channels,
            "size": size,
            "generator-round": generator_round,
            "method": method,
        })
        content = RecordDict({"arrays": ArrayRecord(g_ema), "config": conf})
        LOG.info("synthesis phase: %d sites, method %s, generator round %d", len(node_ids), method, generator_round)
        ok, failed = self._send(node_ids, "synthesize", content)
        sites: dict[str, Any] = {}
        for nid, r in ok.items():
            name = self._name(nid, r)
            sites[name] = {"status": "ok", "node_id": nid, **_metrics(r), **_configs(r)}
        for nid, reason in failed.items():
            name = self._name(nid)
            sites[name] = {"status": "failed", "node_id": nid, "reason": short_reason(reason), "detail": reason}
            LOG.error("synthesis failed at site %s: %s", name, short_reason(reason))
        if not ok:
            raise PhaseError(f"no site completed the synthesis phase: {json.dumps(sites)}")
        return {"sites": sites, "wall_s": round(time.perf_counter() - t0, 2)}

    # ------------------------------------------------------------------ b. downstream
    def downstream(self, num_classes: int, channels: int, size: int):
        from server.downstream import load_pool, train_downstream
        from server.pool.client import pull

        t0 = time.perf_counter()
        if not self.cfg.pool.address:
            raise PhaseError("pool.address is unset: the coordinator has no pool to pull from")
        creds = _reader_credentials(self.cfg)
        pool_dir = self.out / "pool"
        res = pull(self.cfg.pool.address, creds, pool_dir, progress=False, server_name=self.cfg.pool.server_name,
                   log=lambda m: LOG.info("pull: %s", m),
                   policy=RetryPolicy.from_config(self.cfg.pool))  # plumbing: the pool section's retry policy
        LOG.info("pulled %d images (%d files) into %s", res.n_images, res.n_files, pool_dir)
        pooled = load_pool(pool_dir, num_classes, channels)
        per_site: dict[str, int] = {}
        for s in pooled.sites:
            per_site[s] = per_site.get(s, 0) + 1
        model, info = train_downstream(self.cfg, pooled, num_classes, channels, size, progress=False)
        info.update(pool={"n_images": int(res.n_images), "n_files": int(res.n_files), "per_site": per_site,
                          "dir": str(pool_dir)}, wall_s=round(time.perf_counter() - t0, 2))
        return model, info

    # ------------------------------------------------------------------ c+d. evaluation
    def evaluate(self, node_ids: list[int], phi_down, arch: dict[str, int]) -> dict[str, Any]:
        t0 = time.perf_counter()
        conf = ConfigRecord({"plan-config": json.dumps(self.cfg.to_dict()), **{f"arch-{k}": int(v) for k, v in arch.items()}})
        content = RecordDict({"arrays": ArrayRecord(phi_down.state_dict()), "config": conf})
        ok, failed = self._send(node_ids, "evaluate", content)
        sites: dict[str, Any] = {}
        for nid, r in ok.items():
            sites[self._name(nid, r)] = {"status": "ok", **_metrics(r)}
        for nid, reason in failed.items():
            name = self._name(nid)
            sites[name] = {"status": "failed", "reason": short_reason(reason), "detail": reason}
            LOG.error("evaluation failed at site %s: %s", name, short_reason(reason))
        return {"sites": sites, "wall_s": round(time.perf_counter() - t0, 2)}


def _site_figures(out: Path, sites: list[str]) -> dict[str, str]:
    """Simulation only: copy each virtual site's PNGs (path strips, histograms) next to the report.

    In deployment these figures stay at the hospitals (they are made from local data).
    """
    import shutil

    figs: dict[str, str] = {}
    for s in sites:
        src = out / "sites" / s / "synthesis" / "out"
        for name, caption in (("path_strips.png", "PLAN vs linear paths"), ("dcr_hist.png", "distance to closest real image")):
            if (src / name).is_file():
                dst = out / "figures" / f"{s}-{name}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, dst)
                figs[f"{s}: {caption}"] = str(dst.relative_to(out))
    return figs


def _pool_grids(out: Path, pool_dir: Path) -> dict[str, str]:
    """A sample grid per site from the pulled pool (what a researcher actually receives)."""
    import numpy as np

    from plan_shared.data import read_image, to_tensor
    from plan_shared.imaging import save_grid

    doc = json.loads((pool_dir / "manifest.json").read_text())
    by_site: dict[str, list[str]] = {}
    for e in doc.get("images", []):
        by_site.setdefault(e["site_id"], []).append(e["file"])
    figs = {}
    for site, files in sorted(by_site.items()):
        arr = [read_image(pool_dir / f).transpose(2, 0, 1) for f in files[:64]]
        if arr:
            path = save_grid(to_tensor(np.stack(arr)), out / "figures" / f"{site}-pool-samples.png")
            figs[f"{site}: pooled samples"] = str(path.relative_to(out))
    return figs


SITE_RECIPE = "site level, utility recipe (classes section, utility_epochs), mean over sites"
POOL_RECIPE = "pooled, phi_down recipe (downstream section)"


def _comparison_points(synthesis: dict[str, Any], report: dict[str, Any], method: str) -> dict[str, dict[str, tuple]]:
    """Privacy-utility points, one panel per training recipe (each with its own "site alone" reference).

    Site-level panel: each site trains the pipeline's utility classifier on each method's
    accepted images and tests it on its real test split (``compare.<method>.accuracy``),
    and runs the distance MIA against those images (``compare.<method>.mia_auc`` with its
    interval); mean over sites. Its reference "site alone" is the same recipe trained on
    the site's real train split (sharing the train images themselves: distance-MIA AUC 1).
    Pooled panel: phi_down trained on the pool (pooled distance-MIA AUC with interval)
    next to its own reference, the phi_down recipe trained at each site alone (pooled
    accuracy from the sites' confusion matrices). Points: (mia_auc, accuracy, lo, hi).
    """
    pts: dict[str, list[tuple]] = {}
    for s in synthesis.get("sites", {}).values():
        if s.get("status") != "ok":
            continue
        for m in (*METHODS, "real"):
            a, u = s.get(f"compare.{m}.mia_auc"), s.get(f"compare.{m}.accuracy")
            if a is not None and u is not None:
                pts.setdefault(m, []).append((float(a), float(u), s.get(f"compare.{m}.mia_auc_lo"),
                                              s.get(f"compare.{m}.mia_auc_hi")))

    def mean(vals: list) -> Optional[float]:
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    site_panel: dict[str, tuple] = {}
    for m, vals in pts.items():
        label = "site alone (real train split)" if m == "real" else f"{m} (site TSTR)"
        site_panel[label] = tuple(mean([v[i] for v in vals]) for i in range(4))
    pool_panel: dict[str, tuple] = {}
    u, p = report.get("utility", {}), report.get("privacy", {})
    if u.get("accuracy") is not None and p.get("mia_auc") is not None:
        pool_panel[f"{method} (pooled phi_down)"] = (p["mia_auc"], u["accuracy"], p.get("mia_auc_lo"), p.get("mia_auc_hi"))
        if u.get("real_accuracy") is not None and "real" in pts:
            pool_panel["site alone (phi_down recipe)"] = (site_panel["site alone (real train split)"][0], u["real_accuracy"])
    return {k: v for k, v in ((SITE_RECIPE, site_panel), (POOL_RECIPE, pool_panel)) if v}


def publish_final_generator(cfg: PlanConfig, g_ema: dict, channels: int, size: int,
                            num_classes: Optional[int]) -> Optional[str]:
    """Write the final generator's digest into ``pool.policy_file`` (atomic); returns the digest."""
    from plan_shared.gan import generator_digest
    from plan_shared.policy import publish_generator

    if not cfg.pool.policy_file:
        return None
    digest = generator_digest(g_ema)
    pol = publish_generator(cfg.pool.policy_file, digest, channels=channels, size=size,
                            num_classes=cfg.policy.num_classes or num_classes)
    LOG.info("pool policy %s: final generator %s, %sx%s px, %s channel(s), %s classes", cfg.pool.policy_file,
             digest[:16], pol.image_size, pol.image_size, pol.channels, pol.num_classes)
    return digest


def run_post_training(grid: Grid, cfg: PlanConfig, out: Path, node_ids: list[int], site_names: dict[int, str],
                      g_ema: dict, channels: int, size: int, generator_round: int,
                      timing: dict[str, float], federation_summary: dict[str, Any]) -> dict[str, Any]:
    """Phases a-d and the report; returns the report dict (also written to ``out``)."""
    from server.report import build_report, privacy_utility_plot, training_curve_plot, write_report

    method = cfg.synthesis.method
    ph = Phases(grid, cfg, out, site_names, cfg.federation.round_timeout_s)
    t0 = time.perf_counter()
    if cfg.pool.policy_file:
        publish_final_generator(cfg, g_ema, channels, size, cfg.policy.num_classes or ph.num_classes(node_ids))
    synthesis = ph.synthesize(node_ids, g_ema, channels, size, generator_round, method)
    timing["synthesis_s"] = round(time.perf_counter() - t0, 2)
    (out / "synthesis.json").write_text(json.dumps(synthesis, indent=1))
    num_classes = max(int(s.get("num_classes", 0)) for s in synthesis["sites"].values() if s.get("status") == "ok")

    t0 = time.perf_counter()
    phi_down, down = ph.downstream(num_classes, channels, size)
    timing["downstream_s"] = round(time.perf_counter() - t0, 2)
    (out / "downstream.json").write_text(json.dumps(down, indent=1))

    t0 = time.perf_counter()
    evaluation = ph.evaluate(node_ids, phi_down, down["arch"])
    timing["evaluation_s"] = round(time.perf_counter() - t0, 2)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=1, default=float))

    report = build_report(federation=federation_summary, synthesis=synthesis, downstream=down, evaluation=evaluation,
                          timing=timing, config=cfg.to_dict(), method=method)
    figures: dict[str, str] = {}
    figures.update(_pool_grids(out, Path(down["pool"]["dir"])))
    pts = _comparison_points(synthesis, report, method)
    if pts:
        figures["privacy vs utility"] = str(privacy_utility_plot(pts, out / "privacy_utility.png").relative_to(out))
        report["comparison"] = {panel: {k: dict(zip(("mia_auc", "accuracy", "mia_auc_lo", "mia_auc_hi"), v))
                                        for k, v in pp.items()} for panel, pp in pts.items()}
    figures.update(_site_figures(out, sorted(site_names.values())))
    if (curve := training_curve_plot(out / "metrics.jsonl", out / "figures" / "gan-rounds.png")) is not None:
        figures["federated GAN per round"] = str(curve.relative_to(out))
    samples = sorted((out / "samples").glob("round-*.png"))
    if samples:
        figures["generator after the last round"] = str(samples[-1].relative_to(out))
    report["figures"] = figures
    write_report(report, out, figures)
    LOG.info("report written: %s, %s", out / "report.json", out / "report.md")
    return report
