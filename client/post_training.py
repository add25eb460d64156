"""What a site does after federated GAN training (issue 6 phases a, c, d).

- :func:`synthesize_at_site`: rebuild the final global generator from the weights the
  coordinator sent, run the PLAN pipeline (B1-B6) on the site's own images, export
  the accepted images as a signed bundle to the pool, return counts and the privacy
  summary (never images).
- :func:`evaluate_at_site`: score the coordinator's phi_down on the site's real test
  split next to the real-data reference, and audit the site's exported images and
  phi_down for membership leakage.

Both are plain functions (the ClientApp handlers in client/app.py only translate
Flower records), so they are testable without Flower.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from client.site import Site
from plan_shared.config import PlanConfig
from plan_shared.credentials import find_identity_dir
from plan_shared.pool_transport import RetryPolicy
from plan_shared.protocol import ClassifierScore, SiteEvaluation, SynthesisSummary

if TYPE_CHECKING:
    from plan_shared.encoder import EncoderPayload

LOG = logging.getLogger("plan.phases")

def site_credentials(site: Site) -> Path | None:
    """The site's pool credentials: its site.pool_keys_dir, else site.keys_dir/sites/<site-id> in simulation.

    In deployment ``site.cfg.site`` comes from the site's own node config (client/site.py).
    """
    own = site.cfg.site
    if not own.pool_keys_dir and site.partition_id is None:  # deployment: no shared disk to guess from
        return None
    # plumbing: the one credentials-folder rule (plan_shared.credentials.find_identity_dir)
    return find_identity_dir(own.keys_dir, "site", site.site_id, own.pool_keys_dir)


def check_site_minimums(site: Site, cfg: PlanConfig) -> None:
    """Refuse (ValueError) a synthesis request looser than the site's own ``site_minimums``.

    ``cfg`` is the coordinator's request; ``site.cfg.site_minimums`` comes from the site's
    own node config in deployment (client/site.py), so the coordinator cannot loosen it.
    """
    m = site.cfg.site_minimums
    f = cfg.filter
    checks = [
        ("anchors.k", cfg.anchors.k, "min_k", m.min_k, lambda a, b: a < b, "below"),
        ("filter.tau_id", f.tau_id, "max_tau_id", m.max_tau_id, lambda a, b: a > b, "above"),
        ("filter.tau_indep", f.tau_indep, "max_tau_indep", m.max_tau_indep, lambda a, b: a > b, "above"),
        ("filter.delta_quantile", f.delta_quantile, "min_delta_quantile", m.min_delta_quantile, lambda a, b: a < b, "below"),
        ("filter.planted", f.planted, "min_planted", m.min_planted, lambda a, b: a < b, "below"),
    ]
    for key, asked, mkey, floor, looser, word in checks:
        if floor is not None and looser(asked, floor):
            raise ValueError(f"{site.site_id} refuses the synthesis request: the coordinator asks {key} = {asked:g}, "
                             f"{word} this site's site_minimums.{mkey} = {floor:g} (site.yaml); nothing was synthesised")
    if m.block_on_planted and not f.block_on_planted:
        raise ValueError(f"{site.site_id} refuses the synthesis request: the coordinator asks filter.block_on_planted = "
                         f"False, this site's site_minimums.block_on_planted = True (site.yaml); nothing was synthesised")


def synthesis_dir(site: Site) -> Path:
    return site.state_dir / "synthesis"


def synthesize_at_site(
    site: Site,
    cfg: PlanConfig,
    weights: dict[str, torch.Tensor],
    channels: int,
    size: int,
    generator_round: int | None,
    method: str | None = None,
    encoder: EncoderPayload | None = None,
) -> SynthesisSummary:
    """Run the site pipeline with the global generator (and the coordinator's inversion encoder for it,
    when one came with the task) and push the bundle; numbers only out."""
    from client.pipeline import GeneratorSnapshot, run_site_pipeline

    check_site_minimums(site, cfg)  # before any work
    if not site.cfg.site.pool_address and site.partition_id is None:  # fail before the work, not after it
        raise RuntimeError(f"{site.site_id}: no pool address: set site.pool_address in this site's site.yaml "
                           "(the coordinator's pool service, host:port) and restart `plan-client start`")
    t0 = time.perf_counter()
    work = synthesis_dir(site)
    out = work / "out"
    if out.exists():  # a new synthesis phase replaces the previous one (it was exported already)
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    # pipeline: the G_ema weights in memory (no per-site checkpoint: the recorded digest is the model's alone)
    generator = GeneratorSnapshot({k: v for k, v in weights.items() if k.startswith("g_ema.")}, channels, size,
                                  encoder)
    ds = site.dataset()
    report = run_site_pipeline(site.cfg, ds, generator, out, method=method, generator_round=generator_round,
                               progress=False)
    n_accepted = int(report["n_accepted"])
    pool, address = site.cfg.pool, site.cfg.site.pool_address  # the site's own (deployment: from its node config)
    exported = {"bundle_id": "", "status": "not exported (site.pool_address unset)"}
    if n_accepted == 0:
        exported["status"] = "nothing to export: no candidate passed the privacy filter"
        LOG.warning("%s: no candidate passed the privacy filter; nothing exported", site.site_id)
    elif address:
        creds = site_credentials(site)
        if creds is None:
            raise RuntimeError(
                f"{site.site_id}: site.pool_address is {address} but no credentials: set site.pool_keys_dir "
                "to this site's own keys folder (plan-client keys init + keys install)"
            )
        from client.export import export

        res = export(out, address, creds, progress=False, server_name=pool.server_name,
                     log=lambda m: LOG.info("%s: %s", site.site_id, m),
                     policy=RetryPolicy.from_config(pool))  # plumbing: the pool section's whole retry policy
        exported = {"bundle_id": res.bundle_id, "status": "duplicate" if res.duplicate else "stored"}
    summary = summary_from_report(site.site_id, report, int(ds.num_classes), exported["bundle_id"],
                                  exported["status"], round(time.perf_counter() - t0, 2))
    LOG.info("%s: %d/%d candidates accepted, bundle %s (%s)", site.site_id, summary.n_accepted,
             summary.n_candidates, summary.bundle_id[:12], summary.export_status)
    return summary


METHOD_STATS = ("n", "mean_dcr", "p05_dcr", "mean_max_id_prob", "accept_rate")


def summary_from_report(site_id: str, report: dict[str, Any], num_classes: int, bundle_id: str, export_status: str,
                        synthesis_s: float) -> SynthesisSummary:
    """The numbers of the site pipeline's report that go back to the coordinator (figures it lacks are left out)."""
    filt = report["filter"]
    return SynthesisSummary(
        site_id=site_id, bundle_id=bundle_id, export_status=export_status,
        n_candidates=int(report["n_candidates"]), n_accepted=int(report["n_accepted"]),
        planted_total=int(filt["planted_total"]), planted_rejected=int(filt["planted_rejected"]),
        tau_id=float(filt["tau_id"]), delta=float(filt["delta"]), num_classes=num_classes, synthesis_s=synthesis_s,
        compare={m: {k: float(v) for k, v in sec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                 for m, sec in (report.get("compare") or {}).items()},
        methods={m: {k: float(st[k]) for k in METHOD_STATS if st.get(k) is not None}
                 for m, st in (report.get("methods") or {}).items()},
        utility={name: float(sec["accuracy"]) for name, sec in (report.get("utility") or {}).items()
                 if isinstance(sec, dict) and sec.get("accuracy") is not None},
        timing={k: float(v) for k, v in (report.get("timing") or {}).items()},
        method=str(report.get("method") or ""), method_reason=str(report.get("method_reason") or ""),  # autoexport
    )


def exported_images(site: Site) -> np.ndarray:
    """The accepted images this site exported in its last synthesis phase, uint8 [N, C, H, W]."""
    from plan_shared.data import read_image
    from plan_shared.manifest import read_site_manifest

    out = synthesis_dir(site) / "out"
    man = out / "manifest.json"
    if not man.is_file():
        return np.zeros((0,), dtype=np.uint8)
    arrs = [read_image(out / r.file).transpose(2, 0, 1) for r in read_site_manifest(man).images]
    return np.stack(arrs) if arrs else np.zeros((0,), dtype=np.uint8)


def evaluate_at_site(
    site: Site, cfg: PlanConfig, down_state: dict[str, torch.Tensor], arch: dict[str, int]
) -> SiteEvaluation:
    """phi_down and the real reference on the real test split, plus the privacy audit."""
    from client.evaluate import evaluate_downstream, load_downstream
    from plan_shared.audit import privacy_audit

    t0 = time.perf_counter()
    ds = site.dataset()
    if (ds.num_classes, ds.channels, ds.size) != (arch["num_classes"], arch["channels"], arch["size"]):
        raise ValueError(
            f"{site.site_id}: phi_down expects {arch}, the site's data are "
            f"{{'num_classes': {ds.num_classes}, 'channels': {ds.channels}, 'size': {ds.size}}}"
        )
    phi_down = load_downstream(cfg, down_state, arch)
    util = evaluate_downstream(cfg, ds, phi_down)
    syn = exported_images(site)
    if syn.ndim != 4:
        syn = np.zeros((0, ds.channels, ds.size, ds.size), dtype=np.uint8)
    audit = privacy_audit(ds, syn, phi_down)
    result = SiteEvaluation(
        site_id=site.site_id, num_classes=int(ds.num_classes), evaluate_s=round(time.perf_counter() - t0, 2),
        synthetic=ClassifierScore.from_dict(util["synthetic"], ds.num_classes),
        real=ClassifierScore.from_dict(util["real"], ds.num_classes),
        privacy={k: float(v) for k, v in audit.items()},
    )
    nan = float("nan")
    LOG.info("%s: phi_down acc %.3f (real reference %.3f), distance-MIA AUC %.3f", site.site_id,
             result.synthetic.accuracy if result.synthetic.accuracy is not None else nan,
             result.real.accuracy if result.real.accuracy is not None else nan,
             result.privacy.get("mia_auc", nan))
    return result


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))
