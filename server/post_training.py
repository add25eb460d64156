"""Coordinator phases after federated GAN training (issue 6).

Before a: when ``pool.policy_file`` is set, the final G_ema's weights digest (and the
   image shape and classes the sites describe) is written into the pool's policy file
   (:func:`publish_final_generator`); the pool refuses bundles of any other generator.
a. ``synthesize``: a ``SynthesisTask`` with the final G_ema weights to every
   site; each runs the PLAN pipeline, exports its bundle to the pool and answers with
   numbers. A site that fails is recorded with its reason; the others go on.
b. ``downstream``: pull the pool (reader credentials) into ``OUT/pool`` and train phi_down.
c+d. ``evaluate``: an ``EvaluationTask`` with phi_down's weights; each site
   scores it on its real test split next to a real-data reference, and audits its
   exported images and phi_down for membership leakage.
e. ``references`` (``downstream.recipes``): every recipe trained on the pool, with FedAvg
   over the sites' real train splits (*federated real*, ``FedRealTask`` rounds) and, in
   simulation, on all train splits pooled (*central real*); a ``ReferenceTask`` to every
   site, which trains each recipe on its own train split (*site alone*) and scores all of
   them on its real test split (server/downstream.py, client/fedreal.py).

Only weights, counts and metrics cross Flower; images cross only through the pool. The
messages are plan_shared/protocol.py's records, sent through server/messaging.py (a
dead site's error is filed under that site, not under the SuperLink that sent it).
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ArrayRecord

from plan_shared.config import METHODS, PlanConfig
from plan_shared.credentials import find_identity_dir
from plan_shared.pool_transport import RetryPolicy
from plan_shared.protocol import (
    ConfigRef,
    DescribeReply,
    DescribeTask,
    EvaluationTask,
    ReferenceEvaluation,
    ReferenceTask,
    SiteEvaluation,
    SynthesisSummary,
    SynthesisTask,
)
from server.federation import FederationResult
from server.messaging import Exchange, WaitPolicy
from server.report import PhaseResult, SiteFailure, evaluation_json, references_json, synthesis_json

if TYPE_CHECKING:
    from plan_shared.encoder import EncoderPayload

LOG = logging.getLogger("plan.phases")
R = TypeVar("R")  # a phase's decoded site reply


class PhaseError(RuntimeError):
    """A post-training phase cannot go on (no site synthesised, empty pool, ...)."""


def _reader_credentials(cfg: PlanConfig) -> Path:
    # plumbing: the one credentials-folder rule (plan_shared.credentials.find_identity_dir)
    own = cfg.coordinator
    found = find_identity_dir(own.ca_dir, "reader", explicit=own.reader_dir)
    if found is None:
        raise PhaseError(
            f"no reader credentials to pull the pool: set coordinator.reader_dir or run "
            f"`plan-server certs issue --dir CERTS --name coordinator --role reader --out {own.ca_dir}/readers/coordinator`"
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


class Phases:
    """Runs phases a-d over the nodes of a finished federation; every result is also written to ``out``."""

    def __init__(self, result: FederationResult):
        self.result, self.cfg, self.out = result, result.cfg, result.out
        self.messenger = result.messenger
        self.site_names = result.site_names
        self.timeout_s = self.cfg.federation.round_timeout_s
        self.encoder_info: dict[str, Any] = {}  # a. what the coordinator did about the inversion encoder

    def _name(self, nid: int, site_id: str | None = None) -> str:
        if site_id is not None:
            self.site_names[nid] = site_id
        return self.site_names.get(nid, f"node-{nid}")

    def _collect(self, ex: Exchange[R], phase: str, t0: float) -> PhaseResult[R]:
        """Each site's decoded reply, or its failure (logged) filed under its name; the phase's wall time."""
        res: PhaseResult[R] = PhaseResult()
        for nid, reply in ex.replies.items():
            res.add(self._name(nid, getattr(reply, "site_id", None)), nid, reply)
        for nid in ex.missing():
            reason = ex.reason(nid, f"no reply within {self.timeout_s:.0f}s")
            name = self._name(nid)
            res.add(name, nid, SiteFailure(nid, short_reason(reason), reason))
            LOG.error("%s failed at site %s: %s", phase, name, short_reason(reason))
        res.wall_s = round(time.perf_counter() - t0, 2)
        return res

    # ------------------------------------------------------------------ before a. the pool's policy
    def num_classes(self, node_ids: list[int]) -> int | None:
        """The federation's number of classes, as the sites describe their data (None: no site answered)."""
        # A describe is quick (the site loads its data); a dead site must not cost a whole round timeout here.
        timeout_s = min(self.timeout_s, 120.0)
        ex = self.messenger.exchange(node_ids, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record,
                                     WaitPolicy(timeout_s))
        for nid in ex.missing():
            LOG.warning("site %s did not describe its classes: %s", self._name(nid),
                        short_reason(ex.reason(nid, f"no reply within {timeout_s:.0f}s")))
        for nid, r in ex.replies.items():
            self._name(nid, r.site_id)
        return max((r.num_classes for r in ex.replies.values()), default=None)

    # ------------------------------------------------------------------ a. synthesis
    def shipped_encoder(self) -> tuple[EncoderPayload | None, dict[str, Any]]:
        """The inversion encoder every synthesis task carries (``inversion.encoder.train_at: coordinator``).

        Trained once here on the final G_ema's own samples (no real image), written to
        ``inversion.encoder.path`` or ``OUT/encoder.pt`` and reused from there when the digest of
        G matches (a resumed run does not train it twice). ``(None, info)`` when the sites train
        their own or inversion starts from w_avg.
        """
        import torch

        from plan_shared.encoder import encoder_for, encoder_payload
        from plan_shared.gan import generator_digest
        from plan_shared.models.layers import set_fused

        ec = self.cfg.inversion.encoder
        if not ec.enabled:
            return None, {"trained_by": "nobody (inversion.encoder.enabled false)"}
        if ec.train_at != "coordinator":
            return None, {"trained_by": "site"}
        t0 = time.perf_counter()
        # the fused ops: the same function up to float rounding (4e-7 on the demo G), fewer passes (~1.3-1.5x per step)
        G_ema = self.result.trainer.G_ema
        G = copy.deepcopy(G_ema)
        set_fused(G, True)
        sha = generator_digest(self.result.g_ema())  # the digest the sites compute from the weights they receive
        path = ec.path or str(self.out / "encoder.pt")
        LOG.info("inversion encoder: %s for generator %s (%d steps x %d samples, %d torch threads)",
                 "loading or training" if Path(path).is_file() else "training", sha[:12], ec.steps, ec.batch,
                 torch.get_num_threads())
        E, loaded = encoder_for(G, ec.model_copy(update={"path": path}), sha, G_ema.w_avg.device, progress=False,
                                seed=self.cfg.seed)
        payload = encoder_payload(E, sha)
        st = payload.stats
        info: dict[str, Any] = {"trained_by": "coordinator", "path": path, "loaded": loaded,
                                "generator_sha256": sha, "wall_s": round(time.perf_counter() - t0, 2)}
        if st is not None:
            info.update(st.as_dict())
        LOG.info("inversion encoder: %s in %.1fs (%s generator evaluations, final W loss %.3f), shipped with G",
                 "loaded" if loaded else "trained", info["wall_s"], info.get("generator_evals"),
                 info.get("final_w_loss", float("nan")))
        return payload, info

    def synthesize(self, node_ids: list[int], method: str) -> PhaseResult[SynthesisSummary]:
        t0 = time.perf_counter()
        r = self.result
        generator = ArrayRecord(r.g_ema())
        encoder, self.encoder_info = self.shipped_encoder()
        LOG.info("synthesis phase: %d sites, method %s, generator round %d", len(node_ids), method, r.rounds_done)

        def task(nid: int, ref: ConfigRef) -> SynthesisTask:
            return SynthesisTask(generator, r.channels, r.size, r.rounds_done, method, ref, encoder)

        ex = self.messenger.exchange(node_ids, task, SynthesisSummary.from_record, WaitPolicy(self.timeout_s))
        res = self._collect(ex, "synthesis", t0)
        if not ex.replies:
            raise PhaseError(f"no site completed the synthesis phase: {json.dumps(synthesis_json(res)['sites'])}")
        return res

    # ------------------------------------------------------------------ b. downstream
    def downstream(self, num_classes: int, channels: int, size: int) -> tuple[Any, dict[str, Any]]:
        from server.downstream import load_pool, train_downstream
        from server.pool.client import pull

        t0 = time.perf_counter()
        if not self.cfg.coordinator.pool_address:
            raise PhaseError("coordinator.pool_address is unset: the coordinator has no pool to pull from")
        creds = _reader_credentials(self.cfg)
        pool_dir = self.out / "pool"
        res = pull(self.cfg.coordinator.pool_address, creds, pool_dir, progress=False, server_name=self.cfg.pool.server_name,
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
    def evaluate(self, node_ids: list[int], phi_down: Any, arch: dict[str, int]) -> PhaseResult[SiteEvaluation]:
        t0 = time.perf_counter()
        model = ArrayRecord(phi_down.state_dict())

        def task(nid: int, ref: ConfigRef) -> EvaluationTask:
            return EvaluationTask(model, int(arch["num_classes"]), int(arch["channels"]), int(arch["size"]), ref)

        ex = self.messenger.exchange(node_ids, task, SiteEvaluation.from_record, WaitPolicy(self.timeout_s))
        return self._collect(ex, "evaluation", t0)

    # ------------------------------------------------------------------ e. downstream references (fedreal)
    def references(self, node_ids: list[int], phi_down: Any,
                   down: dict[str, Any]) -> tuple[PhaseResult[ReferenceEvaluation], dict[str, Any]]:
        """Every recipe on the pool, federated real and (simulation) central real, scored at every site."""
        from server.downstream import Models, central_real, federated_real, load_pool, train_pool_recipes

        t0 = time.perf_counter()
        cfg, arch = self.cfg, down["arch"]
        pool = load_pool(Path(down["pool"]["dir"]), arch["num_classes"], arch["channels"])
        models: Models = {}
        info: dict[str, Any] = {"recipes": list(cfg.downstream.recipes)}
        t = time.perf_counter()
        got, info["pool"] = train_pool_recipes(cfg, pool, arch["num_classes"], phi_down)
        models.update(got)
        info["pool_s"] = round(time.perf_counter() - t, 2)
        if cfg.downstream.federated_real.enabled:
            t = time.perf_counter()
            got, info["federated_real"] = federated_real(self.messenger, cfg, node_ids, arch, self.timeout_s)
            models.update(got)
            info["federated_real_s"] = round(time.perf_counter() - t, 2)
        if cfg.downstream.central_real:
            t = time.perf_counter()
            try:
                got, info["central_real"] = central_real(cfg, arch["num_classes"])
                models.update(got)
            except (OSError, ValueError) as err:  # the coordinator has no copy of the data (not a simulation)
                LOG.error("central real reference skipped: %s", err)
                info["central_real"] = {"error": str(err)}
            info["central_real_s"] = round(time.perf_counter() - t, 2)
        arrays = {key: ArrayRecord(state) for key, state in models.items()}
        recipes = tuple(cfg.downstream.recipes)

        def task(nid: int, ref: ConfigRef) -> ReferenceTask:
            return ReferenceTask(arrays, recipes, int(arch["num_classes"]), int(arch["channels"]), int(arch["size"]),
                                 ref)

        t = time.perf_counter()
        ex = self.messenger.exchange(node_ids, task, ReferenceEvaluation.from_record, WaitPolicy(self.timeout_s))
        res = self._collect(ex, "references", t)
        info["evaluate_s"] = res.wall_s
        info["wall_s"] = round(time.perf_counter() - t0, 2)
        return res, info


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
    """A sample grid per site from the pulled pool (what a researcher actually receives): 64 of the site's
    images evenly spaced over its manifest order (plan_shared.plots.spread_rows), not its first 64."""
    import numpy as np

    from plan_shared.data import read_image, to_tensor
    from plan_shared.imaging import save_grid
    from plan_shared.plots import spread_rows

    doc = json.loads((pool_dir / "manifest.json").read_text())
    by_site: dict[str, list[str]] = {}
    for e in doc.get("images", []):
        by_site.setdefault(e["site_id"], []).append(e["file"])
    figs = {}
    for site, files in sorted(by_site.items()):
        arr = [read_image(pool_dir / files[i]).transpose(2, 0, 1) for i in spread_rows(len(files), 64)]
        if arr:
            path = save_grid(to_tensor(np.stack(arr)), out / "figures" / f"{site}-pool-samples.png")
            figs[f"{site}: pooled samples"] = str(path.relative_to(out))
    return figs


SITE_RECIPE = "site level, utility recipe (classes section, utility_epochs), mean over sites"
POOL_RECIPE = "pooled, phi_down recipe (downstream section)"


def headline_mia(entry: Mapping[str, Any]) -> tuple[float | None, float | None, float | None]:
    """(AUC, lo, hi) of the distance MIA a plot shows: non-members = val (``mia_val_*``, same source as
    train) where the entry has it, else non-members = test (``mia_*``); see server/report.MIA_PREFIXES."""
    prefix = "mia_val" if entry.get("mia_val_auc") is not None else "mia"
    return entry.get(f"{prefix}_auc"), entry.get(f"{prefix}_auc_lo"), entry.get(f"{prefix}_auc_hi")


def pool_method_label(synthesis: PhaseResult[SynthesisSummary], requested: str) -> str:
    """What the pool holds, for plot labels: the methods the sites exported (``plan+random``), else ``requested``.

    With ``synthesis.method: auto`` each site exports what its own verdict supports, so the
    requested value ("auto") says nothing about the pool's images.
    """
    exported = sorted({s.method for s in synthesis.ok().values() if s.method})
    return "+".join(exported) if exported else requested


def _comparison_points(synthesis: PhaseResult[SynthesisSummary], report: dict[str, Any],
                       method: str) -> dict[str, dict[str, tuple]]:
    """Privacy-utility points, one panel per training recipe (each with its own "site alone" reference).

    Site-level panel: each site trains the pipeline's utility classifier on each method's
    accepted images and tests it on its real test split (``SynthesisSummary.compare[method]
    ["accuracy"]``), and runs the distance MIA against those images (``["mia_auc"]`` with its
    interval); mean over sites. Its reference "site alone" is the same recipe trained on
    the site's real train split (sharing the train images themselves: distance-MIA AUC 1).
    Pooled panel: phi_down trained on the pool (pooled distance-MIA AUC with interval)
    next to its own reference, the phi_down recipe trained at each site alone (pooled
    accuracy from the sites' confusion matrices). Points: (mia_auc, accuracy, lo, hi).
    """
    pts: dict[str, list[tuple]] = {}
    for s in synthesis.ok().values():
        for m in (*METHODS, "real"):
            c = s.compare.get(m, {})
            (a, lo, hi), u = headline_mia(c), c.get("accuracy")
            if a is not None and u is not None:
                pts.setdefault(m, []).append((float(a), float(u), lo, hi))

    def mean(vals: list) -> float | None:
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    site_panel: dict[str, tuple] = {}
    for m, vals in pts.items():
        label = "site alone (real train split)" if m == "real" else f"{m} (site TSTR)"
        site_panel[label] = tuple(mean([v[i] for v in vals]) for i in range(4))
    pool_panel: dict[str, tuple] = {}
    u, p = report.get("utility", {}), report.get("privacy", {})
    if u.get("recipes", {}).get("by_recipe"):  # fedreal: one panel per downstream recipe, its references as lines
        panels = {SITE_RECIPE: site_panel} if site_panel else {}
        return {**panels, **recipe_panels(u["recipes"], p, method)[0]}
    pa, plo, phi = headline_mia(p)
    if u.get("accuracy") is not None and pa is not None:
        pool_panel[f"{method} (pooled phi_down)"] = (pa, u["accuracy"], plo, phi)
        if u.get("real_accuracy") is not None and "real" in pts:
            pool_panel["site alone (phi_down recipe)"] = (site_panel["site alone (real train split)"][0], u["real_accuracy"])
    return {k: v for k, v in ((SITE_RECIPE, site_panel), (POOL_RECIPE, pool_panel)) if v}


def recipe_panel_title(recipe: str) -> str:
    return f"{recipe} recipe, pooled over the sites' real test splits"


def recipe_panels(recipes: dict[str, Any], privacy: dict[str, Any],
                  method: str) -> tuple[dict[str, dict[str, tuple]], dict[str, dict[str, float]]]:
    """Per downstream recipe: the pool point (pooled distance-MIA AUC, accuracy; the mean accuracy over the
    training seeds where ``downstream.seeds`` > 1) and its real references' accuracy."""
    points: dict[str, dict[str, tuple]] = {}
    lines: dict[str, dict[str, float]] = {}
    for recipe, entry in recipes["by_recipe"].items():
        title = recipe_panel_title(recipe)
        acc = entry.get("pool", {}).get("accuracy")
        label = f"{method} pool"
        seeds = entry.get("pool_seeds", {})
        if seeds.get("accuracy", {}).get("mean") is not None:  # downstream.seeds > 1: the mean over the seeds
            acc = seeds["accuracy"]["mean"]
            label += f" (mean of {seeds['n_seeds']} seeds)"
        points[title] = {}
        pa, plo, phi = headline_mia(privacy)
        if acc is not None and pa is not None:
            points[title][label] = (pa, acc, plo, phi)
        lines[title] = {recipes["references"][ref].split(" (")[0]: entry[ref]["accuracy"]
                        for ref in ("site_alone", "federated_real", "central_real")
                        if entry.get(ref, {}).get("accuracy") is not None}
    return points, lines


def publish_final_generator(cfg: PlanConfig, g_ema: dict, channels: int, size: int,
                            num_classes: int | None) -> str | None:
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


def run_post_training(result: FederationResult) -> dict[str, Any]:
    """Phases a-d and the report after the rounds of ``result``; returns the report dict (also written to its out)."""
    from server.report import build_report, privacy_utility_plot, training_curve_plot, write_report

    cfg, out = result.cfg, result.out
    timing = dict(result.timing)
    node_ids = result.node_ids
    method = cfg.synthesis.method
    ph = Phases(result)
    t0 = time.perf_counter()
    if cfg.pool.policy_file:
        publish_final_generator(cfg, result.g_ema(), result.channels, result.size,
                                cfg.policy.num_classes or ph.num_classes(node_ids))
    synthesis = ph.synthesize(node_ids, method)
    timing["synthesis_s"] = round(time.perf_counter() - t0, 2)
    (out / "synthesis.json").write_text(json.dumps(synthesis_json(synthesis, ph.encoder_info), indent=1))
    num_classes = max(s.num_classes for s in synthesis.ok().values())

    t0 = time.perf_counter()
    phi_down, down = ph.downstream(num_classes, result.channels, result.size)
    timing["downstream_s"] = round(time.perf_counter() - t0, 2)
    (out / "downstream.json").write_text(json.dumps(down, indent=1))

    t0 = time.perf_counter()
    evaluation = ph.evaluate(node_ids, phi_down, down["arch"])
    timing["evaluation_s"] = round(time.perf_counter() - t0, 2)
    (out / "evaluation.json").write_text(json.dumps(evaluation_json(evaluation), indent=1, default=float))

    t0 = time.perf_counter()  # fedreal: every recipe against its real references
    references, ref_info = ph.references(node_ids, phi_down, down)
    timing["references_s"] = round(time.perf_counter() - t0, 2)
    (out / "references.json").write_text(json.dumps({"info": ref_info, **references_json(references)}, indent=1))
    down["references"] = ref_info
    if "wall_s" in ph.encoder_info:  # part of synthesis_s: the coordinator trained (or loaded) the inversion encoder
        timing["synthesis_encoder_s"] = float(ph.encoder_info["wall_s"])

    report = build_report(federation=result.summary, synthesis=synthesis, downstream=down, evaluation=evaluation,
                          timing=timing, config=cfg.to_dict(), method=method, references=references)
    report["inversion_encoder"] = dict(ph.encoder_info)  # who trained the sites' inversion encoder, at what cost
    figures: dict[str, str] = {}
    figures.update(_pool_grids(out, Path(down["pool"]["dir"])))
    pool_label = pool_method_label(synthesis, method)
    pts = _comparison_points(synthesis, report, pool_label)
    if pts:
        lines = (recipe_panels(report["utility"]["recipes"], report.get("privacy", {}), pool_label)[1]
                 if report.get("utility", {}).get("recipes", {}).get("by_recipe") else None)
        figures["privacy vs utility"] = str(privacy_utility_plot(pts, out / "privacy_utility.png",
                                                                 references=lines).relative_to(out))
        report["comparison"] = {panel: {k: dict(zip(("mia_auc", "accuracy", "mia_auc_lo", "mia_auc_hi"), v))
                                        for k, v in pp.items()} for panel, pp in pts.items()}
    figures.update(_site_figures(out, sorted(result.site_names.values())))
    if (curve := training_curve_plot(out / "metrics.jsonl", out / "figures" / "gan-rounds.png")) is not None:
        figures["federated GAN per round"] = str(curve.relative_to(out))
    samples = sorted((out / "samples").glob("round-*.png"))
    if samples:
        figures["generator after the last round"] = str(samples[-1].relative_to(out))
    report["figures"] = figures
    write_report(report, out, figures)
    LOG.info("report written: %s, %s", out / "report.json", out / "report.md")
    return report
