"""Site-level TSTR spread and the cost of choosing the export method per site (issue #11.6, autoexport).

One site of the demo's partition (server/presets/demo.yaml + --set) and a reused generator
checkpoint. phi_class is trained once (the pipeline's stage); the random baseline's images are
the pipeline's own (random GAN samples, truncation synthesis.truncation, labelled by phi_class;
the privacy filter is left out: it only drops some of them). Then, for each of ``--seeds`` seeds
of the utility recipe (client/site_stages.train_utility: classes-section architecture,
classes.utility_epochs, class-balanced), the site-level TSTR of

  site alone   the recipe on the site's real train split
  random       the recipe on the random samples

is measured: class-balanced sampling and the last epoch (before), balanced with the epoch of
the best accuracy on the site's real val split (classes.utility_select_on_val), and unbalanced
(classes.utility_balanced false) with the val epoch; accuracy on the site's real test split, with
the seconds of each training. Writes OUT/results.json and prints the table::

    python benchmarks/site_tstr.py --generator /tmp/g.pt --site 0 --seeds 3 --out runs/site_tstr
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from client import site_stages as S
from plan_shared.classifiers import predict_logits
from plan_shared.config import load_config, parse_sets
from plan_shared.data import load_dataset
from plan_shared.navigation import random_samples
from plan_shared.partition import partition_dataset
from plan_shared.runtime import seed_everything, set_threads
from server.demo import demo_preset_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", required=True, help="generator checkpoint")
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--site", type=int, default=0, help="site of the demo partition")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="", help="comma list of unbalanced-val, balanced-last (before), balanced-val (default: all)")
    ap.add_argument("--site-alone-only", action="store_true", help="skip phi_class and the random samples")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--out", default="runs/site_tstr")
    args = ap.parse_args()
    cfg = load_config(demo_preset_path(), overrides={"data.name": args.dataset, "partition.sites": args.sites,
                                                     **parse_sets(args.set)})
    set_threads(args.threads)
    seed_everything(cfg.seed)
    dev = torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = partition_dataset(load_dataset(cfg.data, cfg.seed), cfg.partition, cfg.seed)[args.site]
    gen = S.load_generator(cfg, args.generator, ds, dev)
    data = S.load_site_data(ds)
    val = (data.x_va, data.y_va)
    all_modes = {"unbalanced-val": (False, val), "balanced-last": (True, None), "balanced-val": (True, val)}
    modes = {k: all_modes[k] for k in (args.modes.split(",") if args.modes else all_modes)}
    rows: list[dict[str, Any]] = []
    majority = float(max((data.y_te == k).mean() for k in range(ds.num_classes)))

    def measure(name: str, x: torch.Tensor, y: Any) -> None:
        for mode, (balanced, v) in modes.items():
            for i in range(args.seeds):
                seed = cfg.seed + 21 + i
                mc = cfg.model_copy(update={"classes": cfg.classes.model_copy(update={"utility_balanced": balanced})})
                t0 = time.perf_counter()
                sc = S.train_utility(mc, ds, x, y, data.x_te, data.y_te, seed, name, dev, False, val=v)
                rows.append({"seed": seed, "set": name, "mode": mode, "accuracy": sc.accuracy,
                             "balanced_accuracy": sc.balanced_accuracy, "seconds": round(time.perf_counter() - t0, 2)})
                print(json.dumps(rows[-1]), flush=True)

    measure("site alone", data.x_tr, data.y_tr.numpy())  # first: it needs no generator sample
    sets: tuple[str, ...] = ("site alone",)
    if not args.site_alone_only:
        cls = S.train_class_model(cfg, ds, data, dev, False)
        x_r = S.render(gen.G, random_samples(gen.G, len(data.x_tr), cfg.synthesis.truncation, seed=cfg.seed + 11))
        measure("random", x_r, predict_logits(cls.phi_class, x_r).argmax(1).numpy())
        sets += ("random",)
    summary: dict[str, Any] = {"site": args.site, "n_train": len(data.x_tr), "n_val": len(data.x_va),
                               "n_test": len(data.x_te), "majority_test": majority, "utility_epochs":
                               cfg.classes.utility_epochs, "spread": {}}
    for name in sets:
        for mode in modes:
            acc = [r["accuracy"] for r in rows if r["set"] == name and r["mode"] == mode]
            sec = [r["seconds"] for r in rows if r["set"] == name and r["mode"] == mode]
            summary["spread"][f"{name} / {mode}"] = {
                "accuracy": acc, "min": min(acc), "max": max(acc), "range": max(acc) - min(acc),
                "sd": statistics.stdev(acc) if len(acc) > 1 else 0.0, "mean_s": statistics.fmean(sec)}
    (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(f"site {args.site}: {len(data.x_tr)} train, {len(data.x_va)} val, {len(data.x_te)} test; "
          f"majority class on test {majority:.3f}; utility_epochs {cfg.classes.utility_epochs}")
    print(f"{'set / epoch choice':28s} {'accuracy per seed':28s} {'range':>6s} {'sd':>6s} {'s/train':>8s}")
    for k, e in summary["spread"].items():
        accs = " ".join(f"{a:.3f}" for a in e["accuracy"])
        print(f"{k:28s} {accs:28s} {e['range']:6.3f} {e['sd']:6.3f} {e['mean_s']:8.1f}")


if __name__ == "__main__":
    main()
