"""Pool size, variety and privacy per method for path-plan settings, on one demo site (issue #11.3, #11.6).

One site of the demo's partition (server/presets/demo.yaml + --set), with a reused generator
checkpoint. The site's models are trained once with the pipeline's own stages
(client/site_stages.py: phi_id, the independent identity model, phi_class, the calibrated
filter, the inversion); then, for every variant (overrides of the anchors / synthesis /
navigation sections), the pipeline's anchor, navigation, render, filter and prevalence
stages run and each method's EXPORTED set (filter-passing, prevalence-matched) is measured:

  pool      images exported (and the site's real train images: the full-size target); acc% the filter's accept rate
  prec/rec  precision / recall against the real train split (plan_shared.variety, phi_class features, k=pr_k)
  precF/recF the same in a fixed random-feature net (plan_shared.gan.RandomFeatureNet, the watch-point's): a space
            that neither navigation (L_class optimises phi_class) nor the filter sees
  mia       distance MIA AUC (members = train, non-members = test) with its 95 % interval, TPR at 1 % FPR
  mia_val   the same with non-members = val (the split the verdict reads)
  idp       mean max probability of the independent identity model (navigation never uses it)
  att       the audit's re-identification attacker (trained once on the site's train images, never used by
            navigation or the filter): mean max id-probability, and DCR in its embedding (mean, 5th percentile)
  pdcr      pixel-space DCR of the exported images to the train images (mean, 5th percentile)
  acc       utility recipe trained on the exported set, accuracy on the real test split
  verdict   plan_shared.variety.plan_verdict on those numbers

and the seconds of the variant's path-dependent stages (anchors..compare: what the variant
changes in a site's pipeline time). Per variant also the anchors' spread (issue #11.6): the mean
||w - w_avg|| of the anchors, of the single inverted latents and of the random baseline's w, and the
precision/recall of the anchors' own renders against as many random samples. Writes OUT/results.json
and prints the table::

    python benchmarks/pool_variety.py --generator /tmp/g.pt --site 0 --out runs/pool_variety \\
        --variants before,full
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import site_stages as S
from plan_shared.anchors import w_centre
from plan_shared.audit import attacker_audit, distance_mia
from plan_shared.classifiers import predict_logits
from plan_shared.config import PlanConfig, load_config, parse_sets
from plan_shared.data import load_dataset
from plan_shared.metrics import dcr
from plan_shared.navigation import random_samples
from plan_shared.partition import partition_dataset
from plan_shared.privacy import reject_reasons
from plan_shared.runtime import seed_everything, set_threads
from plan_shared.variety import fixed_precision_recall, method_precision_recall, plan_verdict
from server.demo import demo_preset_path

TODAY = {"synthesis.pool_factor": None, "synthesis.max_paths": 16, "anchors.far_share": 0.0,
         "navigation.T": 20, "navigation.steps": 25}
VARIANTS: dict[str, dict[str, Any]] = {
    "before": TODAY,  # main's demo: 16 nearest pairs spread evenly over classes, 25 steps
    "full-near": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.0,
                  "navigation.steps": 8},
    "full": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
             "navigation.steps": 8},
    "full-far": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 1.0,
                 "navigation.steps": 8},
    "full-nbhd": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                  "anchors.groups": "neighbourhood", "navigation.steps": 8},
    # recall (#11.6): the group means' deviation from w_avg restored (plan_shared/anchors.py spread_anchors)
    "full-plain": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                   "anchors.spread": "none", "navigation.steps": 8},
    "spread-members": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                       "anchors.spread": "members", "navigation.steps": 8},
    "spread-gen": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                   "anchors.spread": "generator", "navigation.steps": 8},
    "spread-gen-x8": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                      "anchors.spread": "generator", "anchors.spread_max_scale": 8.0, "navigation.steps": 8},
    "spread-gen-k3": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                      "anchors.spread": "generator", "anchors.k": 3, "navigation.steps": 8},
    "plain-k3": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                 "anchors.spread": "none", "anchors.k": 3, "navigation.steps": 8},
    # recall (#11.6): shorter paths, so the same candidates come from more anchor pairs (paths x T x steps kept)
    "plain-T8": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                 "anchors.spread": "none", "navigation.T": 8, "navigation.steps": 8},
    "gen-T8": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
               "anchors.spread": "generator", "navigation.T": 8, "navigation.steps": 8},
    # realism vs recall (stop 22): the generator target stretches anchors to the random samples' radius, whose renders
    # at a weak G are blobs; the group's own latents' radius, or a smaller stretch, keeps them nearer the data
    "members-T8": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                   "anchors.spread": "members", "navigation.T": 8, "navigation.steps": 8},
    "gen-T8-x1.5": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
                    "anchors.spread": "generator", "anchors.spread_max_scale": 1.5, "navigation.T": 8,
                    "navigation.steps": 8},
    "gen-T5": {"synthesis.pool_factor": 1.0, "synthesis.max_paths": None, "anchors.far_share": 0.5,
               "anchors.spread": "generator", "navigation.T": 5, "navigation.steps": 8},
}


def with_overrides(cfg: PlanConfig, over: dict[str, Any]) -> PlanConfig:
    """``cfg`` with dotted ``section.key`` overrides, validated by the sections' schemas."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in over.items():
        sec, name = key.split(".", 1)
        sections.setdefault(sec, {})[name] = value
    upd = {sec: type(getattr(cfg, sec)).model_validate(getattr(cfg, sec).model_dump() | kv)
           for sec, kv in sections.items()}
    return cfg.model_copy(update=upd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", required=True, help="generator checkpoint (a copy: never a path under a run you keep)")
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--site", type=int, default=0, help="site of the demo partition")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE for every variant")
    ap.add_argument("--out", default="runs/pool_variety")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    t_all = time.perf_counter()
    cfg = load_config(demo_preset_path(), overrides={"data.name": args.dataset, "partition.sites": args.sites,
                                                     **parse_sets(args.set)})
    set_threads(args.threads)
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    def tick(name: str, t0: float) -> None:
        timing[name] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - t_all:6.0f} s] {name} ({timing[name]} s)", flush=True)

    t0 = time.perf_counter()
    ds = partition_dataset(load_dataset(cfg.data, cfg.seed), cfg.partition, cfg.seed)[args.site]
    gen = S.load_generator(cfg, args.generator, ds, dev)
    data = S.load_site_data(ds)
    ids = S.IdentityModels(S.train_identity_model(cfg, ds, data, dev, False),
                           S.train_identity_model(cfg, ds, data, dev, False, independent=True))
    cls = S.train_class_model(cfg, ds, data, dev, False)
    cal = S.calibrate_filter(cfg, data, ids.indep)
    inv = S.invert_train_images(cfg, ds, data, gen.G, ids.phi_id, gen.sha256, dev, False)
    real = S.train_utility(cfg, ds, data.x_tr, data.y_tr.numpy(), data.x_te, data.y_te, cfg.seed + 21, "real", dev,
                           False)
    centre = inv.centre or w_centre(gen.G, cfg.synthesis.truncation, seed=cfg.seed)
    w_rand = random_samples(gen.G, 4096, cfg.synthesis.truncation, seed=cfg.seed + 11).cpu()

    def dev_norm(w: torch.Tensor) -> float:
        return round(float((w.cpu().float() - centre.w_avg).norm(dim=1).mean()), 3) if len(w) else float("nan")

    spread_ref: dict[str, Any] = {"w_radius": round(centre.radius, 3), "random_w": dev_norm(w_rand),
                  "inverted_w": dev_norm(inv.w), "truncation": cfg.synthesis.truncation}
    inv_pr = method_precision_recall(cls.phi_class, data.x_tr, {"inverted": S.render(gen.G, inv.w),
                                                               "random": S.render(gen.G, w_rand[: len(inv.w)])},
                                     cfg.synthesis.pr_k)
    spread_ref |= {f"{m}_renders_{k}": v[k] for m, v in inv_pr.items() for k in ("precision", "recall")}
    print("spread reference:", spread_ref, flush=True)
    tick("site models + inversion (once)", t0)

    results: dict[str, Any] = {}
    exported: dict[str, torch.Tensor] = {}
    flat_tr = data.x_tr.flatten(1)
    for name in names:
        vc = with_overrides(cfg, VARIANTS[name])
        t0 = time.perf_counter()
        apairs = S.anchor_pairs(vc, ds, inv, dev)
        paths = S.navigate_paths(vc, gen.G, ids.phi_id, cls.phi_class, apairs, inv.sigma_w, dev, False)
        cand = S.render_candidates(vc, gen.G, paths, cls.phi_class)
        flt = S.filter_candidates(vc, "plan", cand, ids, cal, data)
        t_nav = time.perf_counter() - t0
        rows: dict[str, dict[str, Any]] = {}
        sets: dict[str, torch.Tensor] = {}
        for m, c in cand.items():
            keep, prev = S.match_class_shares(vc, ds, c, flt.passed(m))
            sets[m] = c.images[keep]
            util = S.train_utility(vc, ds, c.images[keep], c.labels[keep], data.x_te, data.y_te, vc.seed + 21,
                                   f"utility {m}", dev, False)
            mia = distance_mia(data.x_tr, data.x_te, c.images[keep])
            idp = (float(torch.softmax(predict_logits(ids.indep, c.images[keep]), 1).max(1).values.mean())
                   if len(keep) else None)
            exported[f"{name}/{m}"] = c.images[keep]
            if len(data.x_va):
                mia |= distance_mia(data.x_tr, data.x_va, c.images[keep], prefix="mia_val")
            pd = dcr(c.images[keep].flatten(1), flat_tr)
            rows[m] = {"candidates": len(c), "accepted": int(len(flt.passed(m))), "pool": int(len(keep)),
                       "accept_rate": flt.methods[m].accept_rate,
                       "pixel_dcr_mean": float(pd.mean()) if len(pd) else None,
                       "pixel_dcr_p05": float(np.quantile(pd, 0.05)) if len(pd) else None,
                       "reject_reasons": reject_reasons(flt.scores[m], cal.thresholds, cal.delta_pixel),
                       "exported_per_class": None if prev is None else prev["exported_per_class"],
                       "accuracy": util.accuracy, "qwk": util.qwk, **mia, "mean_indep_id_prob": idp}
        for meth, pr in method_precision_recall(cls.phi_class, data.x_tr, sets, vc.synthesis.pr_k).items():
            rows[meth] |= {"precision": pr["precision"], "recall": pr["recall"]}
        # the same in a fixed random-feature space that neither navigation nor the filter sees (L_class pulls PLAN's
        # points together in phi_class's own space, so the row above is biased against PLAN)
        for meth, pr in fixed_precision_recall(data.x_tr, sets, vc.synthesis.pr_k).items():
            rows[meth] |= {"precision_fixed": pr["precision_fixed"], "recall_fixed": pr["recall_fixed"]}
        dt = time.perf_counter() - t0
        a_pr = method_precision_recall(cls.phi_class, data.x_tr, {
            "anchors": S.render(gen.G, apairs.anchors.anchors),
            "random": S.render(gen.G, w_rand[: len(apairs.anchors.anchors)])}, vc.synthesis.pr_k)
        spread = {"anchors_w": dev_norm(apairs.anchors.anchors), "n_anchors": len(apairs.anchors.anchors),
                  **{f"{m}_renders_{k}": v[k] for m, v in a_pr.items() for k in ("precision", "recall")}}
        print(f"{name} spread:", spread, flush=True)
        results[name] = {"spread": spread, "overrides": VARIANTS[name],
                         "anchors": apairs.section.summary | {"n_paths": apairs.section.n_paths},
                         "methods": rows, "verdict": plan_verdict(rows, vc.synthesis),
                         "seconds_paths_to_filter": round(t_nav, 1), "seconds_with_measures": round(dt, 1),
                         "nav_steps_run_mean": None if paths.section is None else paths.section.steps_run_mean}
        tick(f"variant {name}", t0)
        (out / "results.json").write_text(json.dumps(
            {"generator": args.generator, "dataset": args.dataset, "site": args.site, "n_train": len(data.x_tr),
             "real_accuracy": real.accuracy, "spread_reference": spread_ref, "results": results,
             "timing_s": timing}, indent=1, default=str) + "\n")

    # the attacker once, on the site's train images, scoring every variant's exported set
    t0 = time.perf_counter()
    att = attacker_audit(cfg.audit.attacker, data.x_tr, data.id_labels, data.x_te, exported | {"real/train": data.x_tr},
                         dev)
    for key, vals in att.sets.items():
        vname, method = key.split("/", 1)
        if vname in results:
            results[vname]["methods"][method] |= vals
    tick("attacker (once, all variants)", t0)
    (out / "results.json").write_text(json.dumps(
        {"generator": args.generator, "dataset": args.dataset, "site": args.site, "n_train": len(data.x_tr),
         "real_accuracy": real.accuracy, "spread_reference": spread_ref, "attacker": att.attacker,
         "attacker_real_train": att.sets.get("real/train"), "results": results, "timing_s": timing},
        indent=1, default=str) + "\n")

    print(f"\nsite {args.site}: {len(data.x_tr)} real train images, real-data utility accuracy {real.accuracy}")
    print("spread reference (mean ||w - w_avg||, render precision/recall):", spread_ref)
    print(f"{'variant':14s} {'method':7s} {'cand':>5s} {'acc':>5s} {'acc%':>5s} {'pool':>5s} {'prec':>5s} {'rec':>5s} "
          f"{'precF':>5s} {'recF':>5s} {'mia':>5s} {'mia95':>11s} {'tpr1':>5s} {'miaV':>5s} {'idp':>5s} {'attp':>5s} "
          f"{'attd':>5s} {'attd5':>5s} "
          f"{'pdcr':>5s} {'pdcr5':>5s} {'util':>5s}  s")

    def f(v: Any) -> str:
        return "  -  " if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:5.3f}"

    for name, r in results.items():
        for m, x in r["methods"].items():
            print(f"{name:14s} {m:7s} {x['candidates']:5d} {x['accepted']:5d} {f(x['accept_rate'])} {x['pool']:5d} "
                  f"{f(x['precision'])} {f(x['recall'])} {f(x.get('precision_fixed'))} {f(x.get('recall_fixed'))} "
                  f"{f(x['mia_auc'])} {f(x['mia_auc_lo'])}-{f(x['mia_auc_hi'])} "
                  f"{f(x['mia_tpr_at_1pct_fpr'])} {f(x.get('mia_val_auc'))} {f(x['mean_indep_id_prob'])} "
                  f"{f(x.get('attacker_max_id_prob'))} {f(x.get('attacker_dcr'))} {f(x.get('attacker_dcr_p05'))} "
                  f"{f(x['pixel_dcr_mean'])} {f(x['pixel_dcr_p05'])} {f(x['accuracy'])}  {r['seconds_with_measures']}")
        print(f"{'':14s} spread: {r['spread']}")
        print(f"{'':14s} verdict: {r['verdict']['verdict']}")


if __name__ == "__main__":
    main()
