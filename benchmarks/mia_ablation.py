"""Which filter check makes the accepted set leak membership? Distance-MIA under filter ablations (issue #11.2).

One simulated site of the demo partition (``--config``: a full config such as a demo run's
config.yaml, default the demo preset over the defaults; ``--site`` picks the partition row),
with a generator checkpoint (``--generator``, e.g. a copy of the demo's final federated G).
The site stages of client/site_stages.py run once, as client/pipeline.py runs them (identity
models, phi_class, calibration, inversion, anchors, navigation, render, filter); then the
candidates' filter scores are re-thresholded under each ablation:

  all          every check in force (what the site exports before prevalence matching)
  no_tau_id    phi_id's max-probability check off
  no_tau_indep the independent identity model's check off
  no_dcr       the embedding-space exclusion zone off
  no_pixel     the pixel-space exclusion zone off
  none         no filter at all (every candidate)

For each method (plan, random) and ablation: accepted count and the distance membership
inference of plan_shared.audit.distance_mia on the accepted images (members = site train,
non-members = site test; AUC, 95 % bootstrap interval, TPR at 1 % FPR). Two null references
use pools that carry no information about the site's membership at all (real images of
OTHER sites' test / train splits, as many as the plan candidates): an attack that is not
at 0.5 against them measures a difference between the site's train and test splits
(covariate shift), not a leak of the pool.

    python benchmarks/mia_ablation.py --generator /tmp/g.pt --config /work/runs/demo-s17/out/config.yaml \\
        --site 1 --out runs/mia_ablation [--set filter.identity_classes=train]

Writes OUT/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client import site_stages as S
from plan_shared.audit import distance_mia
from plan_shared.config import load_config, parse_sets
from plan_shared.data import load_dataset, to_tensor
from plan_shared.partition import partition_dataset
from plan_shared.privacy import Scores, accept_mask
from plan_shared.runtime import resolve_device, seed_everything, set_threads

DEMO = Path(__file__).resolve().parents[1] / "server" / "presets" / "demo.yaml"
INF = float("inf")


def ablations(s: Scores, cal: S.Calibration) -> dict[str, np.ndarray]:
    th, dp = cal.thresholds, cal.delta_pixel
    return {
        "all": accept_mask(s, th, dp),
        "no_tau_id": accept_mask(s, replace(th, tau_id=INF), dp),
        "no_tau_indep": accept_mask(s, replace(th, tau_indep=INF), dp),
        "no_dcr": accept_mask(s, replace(th, delta=-INF), dp),
        "no_pixel": accept_mask(s, th, None),
        "none": np.ones(len(s), dtype=bool),
    }


def mia_row(x_tr: torch.Tensor, x_te: torch.Tensor, pool: torch.Tensor) -> dict[str, Any]:
    m = distance_mia(x_tr, x_te, pool)
    return {"n": len(pool)} | {k: float(v) for k, v in m.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", required=True)
    ap.add_argument("--config", default=str(DEMO))
    ap.add_argument("--site", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/mia_ablation")
    a = ap.parse_args()
    overrides = {"data.download": False, "threads": 1} | parse_sets(a.set)
    cfg = load_config(a.config, overrides)
    cfg = cfg.model_copy(update={"site_id": f"site-{a.site}"})
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    parts = partition_dataset(load_dataset(cfg.data, cfg.seed), cfg.partition, cfg.seed)
    ds = parts[a.site]
    timing: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        timing[name] = round(time.perf_counter() - t0, 2)
        return out

    gen = S.load_generator(cfg, a.generator, ds, dev)
    data = S.load_site_data(ds)
    idset = S.identity_training_set(cfg, data)
    phi_id = timed("phi_id", S.train_identity_model, cfg, ds, data, dev, False)
    ids = S.IdentityModels(phi_id, timed("indep_id", S.train_identity_model, cfg, ds, data, dev, False, independent=True))
    cls = timed("phi_class", S.train_class_model, cfg, ds, data, dev, False)
    cal = timed("calibrate", S.calibrate_filter, cfg, data, ids.indep)
    inv = timed("inversion", S.invert_train_images, cfg, ds, data, gen.G, ids.phi_id, gen.sha256, dev, False)
    pairs = S.anchor_pairs(cfg, ds, inv, dev)
    paths = timed("navigation", S.navigate_paths, cfg, gen.G, ids.phi_id, cls.phi_class, pairs, inv.sigma_w, dev, False)
    cand = S.render_candidates(cfg, gen.G, paths, cls.phi_class)
    flt = timed("filter", S.filter_candidates, cfg, "plan", cand, ids, cal, data)

    rows: dict[str, dict[str, Any]] = {}
    for method in ("plan", "random"):
        for name, keep in ablations(flt.scores[method], cal).items():
            rows[f"{method}/{name}"] = mia_row(data.x_tr, data.x_te, cand[method].images[np.flatnonzero(keep)])
    n_null = len(cand["plan"])
    rng = np.random.default_rng(cfg.seed)
    for split in ("test", "train"):
        other = torch.cat([to_tensor(p.splits()[split].images) for j, p in enumerate(parts) if j != a.site])
        pick = rng.choice(len(other), min(n_null, len(other)), replace=False)
        rows[f"null/other-sites {split}"] = mia_row(data.x_tr, data.x_te, other[pick])
    result = {
        "site": a.site, "n_train": len(data.x_tr), "n_test": len(data.x_te), "n_identity_classes": idset.by_split,
        "identity_classes": cfg.filter.identity_classes, "thresholds": cal.thresholds.to_dict(),
        "delta_pixel": cal.delta_pixel, "filter_reasons": flt.section.reject_reasons,
        "planted_rejected": [flt.section.planted_rejected, flt.section.planted_total],
        "planted_heldout_rejected": [flt.section.planted_heldout_rejected, flt.section.planted_heldout_total],
        "phi_class_test_acc": cls.section.phi_class_test_acc, "timing_s": timing, "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"site {a.site}: train {len(data.x_tr)}, test {len(data.x_te)}, identity classes "
          f"{cfg.filter.identity_classes} {idset.by_split}, timing {timing}")
    print(f"{'set':28s} {'n':>5s} {'AUC':>6s} {'95% CI':>15s} {'TPR@1%':>7s}")
    for k, r in rows.items():
        print(f"{k:28s} {r['n']:5d} {r['mia_auc']:6.3f} [{r['mia_auc_lo']:.3f}, {r['mia_auc_hi']:.3f}] "
              f"{r['mia_tpr_at_1pct_fpr']:7.3f}")


if __name__ == "__main__":
    main()
