"""The site pipeline B1-B6 of method.md, as one reusable function.

``run_site_pipeline(cfg, dataset, generator, out_dir, method)`` trains phi_id,
the independent identity model and phi_class on the site's real train split, inverts
(a budgeted subsample of) the train images into W, forms k-same anchors, optimises
PLAN paths and the linear baseline between the same anchor pairs, draws random GAN
samples, scores every candidate with the privacy filter (with planted near-duplicates
that must be rejected), compares the methods (utility, membership inference, attacker,
variety) and computes the verdict, exports the accepted images of ``method`` (``auto``:
the method the verdict supports, plan_shared.variety.export_choice) and writes::

    OUT/images/<class>/<id>.png      accepted images only
    OUT/manifest.json                plan_shared.manifest format, one record per image
    OUT/report.json                  counts, filter, per-method comparison, utility, timing
    OUT/path_strips.png  OUT/samples.png  OUT/dcr_hist.png

``generator`` is a checkpoint path (``plan-client synthesize``) or, in the federation,
the global G_ema weights in memory (:class:`client.site_stages.GeneratorSnapshot`).
The stages themselves live in client/site_stages.py (its docstring has the table), the
report's sections in client/site_report.py; this module only runs them in order.
Nothing that identifies a patient (real images, latents, phi_id) is written to OUT.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client import site_stages as S
from client.site_report import GeneratorSection, SiteReport, json_default
from client.site_stages import (
    GeneratorSnapshot,
    GeneratorSource,
    PrivacyInvariantError,
    check_method,
    check_requested_method,
)
from plan_shared import progress as P
from plan_shared.config import METHODS, PlanConfig
from plan_shared.data import ImageDataset
from plan_shared.runtime import resolve_device, seed_everything, set_threads
from plan_shared.variety import export_choice

__all__ = ["METHODS", "GeneratorSnapshot", "PrivacyInvariantError", "pipeline_stages", "run_site_pipeline",
           "write_report"]
LOG = logging.getLogger("plan.pipeline")
METHODS_NOTE = ("plan/linear: all interior path points of the same anchor pairs, before the filter; "
                "random: plain GAN samples (truncation %.2f) labelled by phi_class")


class _Timer:
    """Stage timings for report.json; every stage is also a stage of the progress reporter."""

    def __init__(self, reporter: P.Reporter) -> None:
        self.timing: dict[str, float] = {}
        self.reporter = reporter

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.reporter.stage(name):
            yield
        self.timing[name] = round(time.perf_counter() - t0, 2)


def pipeline_stages(cfg: PlanConfig) -> list[str]:
    """The pipeline's stages in order (what the progress lines count as ``stage i/n``)."""
    st = ["load", "phi_id", "indep_id", "phi_class", "calibrate", "inversion", "anchors", "navigation", "render",
          "filter"]
    return st + (["compare"] if cfg.synthesis.compare else []) + ["export", "utility", "figures"]


def run_site_pipeline(
    cfg: PlanConfig,
    dataset: ImageDataset,
    generator: GeneratorSource,
    out_dir: str | Path,
    method: str | None = None,
    generator_round: int | None = None,
    progress: bool = True,
    reporter: P.Reporter | None = None,
) -> dict[str, Any]:
    """Run B1-B6 on ``dataset`` with ``generator`` (checkpoint path or snapshot); write ``out_dir``; return report.json.

    Progress goes to ``reporter`` (its stages: :func:`pipeline_stages`), else to the active
    one (plan_shared.progress.active), else to the ``plan.progress`` log (and tqdm bars
    when ``progress``).
    """
    rep = reporter or P.current()
    own = rep is None
    rep = rep or P.Reporter(cfg.site_id, [P.LogSink()], show_bars=progress)
    rep.stages = pipeline_stages(cfg)
    try:
        with P.active(rep):
            return _run_site_pipeline(cfg, dataset, generator, out_dir, method, generator_round, progress,
                                      rep).to_json()
    finally:
        if own:
            rep.close()


def _run_site_pipeline(cfg: PlanConfig, ds: ImageDataset, generator: GeneratorSource, out_dir: str | Path,
                       method: str | None, generator_round: int | None, progress: bool,
                       rep: P.Reporter) -> SiteReport:
    """The stages of client/site_stages.py in order, one timed progress stage each (see its table)."""
    requested = check_requested_method(method or cfg.synthesis.method)  # autoexport: auto or a forced method
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images").exists() and any((out / "images").rglob("*.png")):
        raise FileExistsError(f"{out}/images already holds images; choose an empty output dir")
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    tm, t_all = _Timer(rep), time.perf_counter()
    with tm.stage("load"):
        gen = S.load_generator(cfg, generator, ds, dev)
        data = S.load_site_data(ds)
    with tm.stage("phi_id"):  # B1
        phi_id = S.train_identity_model(cfg, ds, data, dev, progress)
    with tm.stage("indep_id"):
        ids = S.IdentityModels(phi_id, S.train_identity_model(cfg, ds, data, dev, progress, independent=True))
    identity = S.identity_section(cfg, data, ids)
    with tm.stage("phi_class"):  # B2
        cls = S.train_class_model(cfg, ds, data, dev, progress)
    with tm.stage("calibrate"):
        cal = S.calibrate_filter(cfg, data, ids.indep)
    with tm.stage("inversion"):  # B3
        inv = S.invert_train_images(cfg, ds, data, gen.G, ids.phi_id, gen.sha256, dev, progress, gen.encoder)
    with tm.stage("anchors"):  # B4
        ap = S.anchor_pairs(cfg, ds, inv, dev)
    with tm.stage("navigation"):  # B5
        paths = S.navigate_paths(cfg, gen.G, ids.phi_id, cls.phi_class, ap, inv.sigma_w, dev, progress)
    with tm.stage("render"):
        cand = S.render_candidates(cfg, gen.G, paths, cls.phi_class)
    with tm.stage("filter"):  # B6
        # autoexport: with auto every method's candidates go through the planted test (the export is chosen later)
        flt = S.filter_candidates(cfg, None if requested == "auto" else check_method(requested), cand, ids, cal, data)
    cmp, attacker = None, None
    if cfg.synthesis.compare:
        with tm.stage("compare"):  # autoexport: before the export, so that the verdict can choose the method
            cmp = S.compare_methods(cfg, ds, data, cand, flt, dev, progress)
            S.add_precision_recall(cfg, cmp.points, cls.phi_class, data, cand, flt)
            attacker = S.attacker_of_site(cfg, data, cand, flt, cmp.points, dev, progress)  # wplus: the audit's attacker
    verdict = S.verdict_of(cfg, cmp.points, flt.methods) if cmp is not None else None  # fullpool
    choice = export_choice(requested, verdict, cfg.synthesis)  # autoexport: the method the measurements support
    m = choice.method
    LOG.info("%s exports %s (%s)", cfg.site_id, m, choice.reason)
    if not ap.pairs and m != "random":
        LOG.warning("no anchor pairs (too few images per class for k=%d): no path candidates", cfg.anchors.k)
    flt = S.filter_for_export(flt, m, cal)  # autoexport: the filter section's reject reasons are the exported method's
    with tm.stage("export"):
        if flt.blocked:
            LOG.error("export blocked: the filter let planted near-duplicates through (filter.block_on_planted)")
        passed, prevalence = S.match_class_shares(cfg, ds, cand[m], flt.passed(m))
        exported = passed[:0] if flt.blocked else passed
        S.write_site_dir(out, cfg, cand[m], flt.scores[m], exported, cal.thresholds, cal.delta_pixel,
                         ds.class_names, gen.sha256, generator_round)
    with tm.stage("utility"):  # autoexport: compare's entries reused (nothing trained twice)
        utility = S.utility_of_site(cfg, ds, data, cand[m], passed, flt.blocked, dev, progress,
                                    known=cmp.utility if cmp is not None else None)
    with tm.stage("figures"):
        figures = S.write_figures(cfg, out, gen.G, paths, ids, cal, cand, flt, m, ds.class_names)
    tm.timing["total"] = round(time.perf_counter() - t_all, 2)
    report = SiteReport(
        site_id=cfg.site_id, dataset=ds.name, method=m, device=str(dev), data=data.section(), identity=identity,
        classes=cls.section, inversion=inv.section, anchors=ap.section, navigation=paths.section, filter=flt.section,
        methods=flt.methods, methods_note=METHODS_NOTE % cfg.synthesis.truncation, utility=utility,
        compare=cmp.points if cmp is not None else None,
        figures=figures, n_candidates=len(cand[m]), n_accepted=len(exported), prevalence=prevalence, attacker=attacker,
        verdict=verdict, method_requested=choice.requested, method_reason=choice.reason,  # autoexport
        generator=GeneratorSection(gen.checkpoint, gen.sha256, generator_round), config_sha256=cfg.digest(),
        timing=tm.timing)
    write_report(out, report.to_json())
    return report


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """``out/report.json`` (numpy scalars and arrays as plain JSON, non-finite numbers as null)."""
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=1, default=json_default) + "\n")
    return path
