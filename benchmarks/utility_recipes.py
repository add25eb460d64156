"""Utility of a pulled pool under each downstream recipe, against the same recipe on real data (issue 11 item 4).

Given a pulled pool folder (``plan-server pool pull`` / a demo's ``OUT/pool``) and the run's
config (its data set and partition), every recipe of ``--recipes`` (plan_shared/recipes.py,
the pipeline's own ``phi_down`` and ``plain``, each with the config's settings: nothing is
tuned here) is trained on

- ``pool``: the pooled synthetic images (server/downstream.py ``load_pool``, the coordinator's loader);
- ``central_real``: all sites' real train splits pooled (the partition the sites use);
- ``site_alone``: each site's own real train split, scored on that site's test split;

and scored on the real test split (the sites' test splits together, as the report's pooled
figures): accuracy, balanced accuracy, Cohen's kappa (sklearn, unweighted; equal to the
report's quadratic kappa for two classes), ROC AUC, per-class recall, the predicted class
prevalence, and for two classes the accuracy at the best threshold on the test set (a
diagnostic only: how much of a gap a shifted decision threshold explains when the AUC holds).
Ratios are pool / reference per recipe. The issue's target: accuracy >= 0.90x and kappa
>= 0.85x the reference for every recipe.

Seeds, thread count, the load average and the seconds of every training are written to the
JSON (rewritten after each training, so a cut-off run keeps what finished) and a table is
printed. ``--probe`` instead times one epoch of each recipe on a few pool images and
extrapolates the seconds per epoch of every training set (plan a run before starting it).

Measured (seed 0, 1 thread, config defaults; load 9-37 on 2 shared cores, so seconds are not idle figures):
pneumoniamnist demo pool (2,813 images, 3 Dirichlet(0.5) sites) on 468 test images, plain: pool acc 0.846 /
kappa 0.692 / AUC 0.933 vs central real 0.863 / 0.726 / 0.974 (x0.98 / x0.95); phi_down: 0.872 / 0.744 / 0.937
vs 0.840 / 0.679 / 0.979. breastmnist demo pool (266 images, 2 of 3 sites exported), 156 test images, plain:
0.679 / 0.209 vs central real 0.814 / 0.458 (x0.83 / x0.46); phi_down 0.551 / 0.153 vs 0.776 / 0.508.

    python benchmarks/utility_recipes.py --pool runs/demo/out/pool --config runs/demo/out/config.yaml \\
        --recipes phi_down,plain --sets pool,central_real,site_alone --out utility_recipes.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score

from plan_shared.classifiers import recalibrate_bn
from plan_shared.config import load_config, parse_sets
from plan_shared.data import ImageDataset, load_dataset, to_tensor
from plan_shared.metrics import scores_from_probs
from plan_shared.partition import partition_dataset
from plan_shared.recipes import RECIPES, make_recipe

SETS = ("pool", "central_real", "site_alone")
METRICS = ("accuracy", "kappa", "roc_auc")


def score(y: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy, Cohen's kappa, ROC AUC, per-class recall and predicted prevalence."""
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(y), num_classes):
        raise ValueError(f"score: need probabilities [{len(y)}, {num_classes}], got {p.shape}")
    pred = p.argmax(1)
    base = scores_from_probs(y, p)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(1)
    out: dict[str, Any] = {
        "accuracy": base["accuracy"],
        "balanced_accuracy": base["balanced_accuracy"],
        "kappa": float(cohen_kappa_score(y, pred)) if len(np.unique(np.concatenate([y, pred]))) > 1 else float("nan"),
        "roc_auc": base["roc_auc"],
        "recall": [float(cm[c, c] / support[c]) if support[c] else float("nan") for c in range(num_classes)],
        "predicted_prevalence": (np.bincount(pred, minlength=num_classes) / max(len(y), 1)).tolist(),
        "true_prevalence": (support / max(len(y), 1)).tolist(),
        "confusion": cm.tolist(),
        "n": int(len(y)),
    }
    if num_classes == 2:
        out.update(best_threshold(y, p[:, 1]))
    return out


def best_threshold(y: np.ndarray, p1: np.ndarray) -> dict[str, float]:
    """The accuracy at the threshold on P(class 1) that maximises it on these labels (diagnostic, not a result)."""
    y = np.asarray(y, dtype=np.int64)
    p1 = np.asarray(p1, dtype=np.float64)
    if len(y) == 0:
        return {"best_threshold": float("nan"), "best_threshold_accuracy": float("nan")}
    order = np.argsort(-p1, kind="stable")
    ys, ps = y[order], p1[order]
    # predicting class 1 for the first i (highest P) images: correct = positives among them + negatives after them
    pos_before = np.concatenate([[0], np.cumsum(ys)])
    neg_after = np.concatenate([[0], np.cumsum((1 - ys)[::-1])])[::-1]
    correct = pos_before + neg_after
    cut = [i for i in range(len(ys) + 1) if i in (0, len(ys)) or ps[i - 1] > ps[i]]  # only between distinct P values
    i = max(cut, key=lambda j: (correct[j], -abs(j - len(ys) / 2)))
    if i == 0:
        thr = float(ps[0]) + 1e-12
    elif i == len(ys):
        thr = float(ps[-1])
    else:
        thr = float((ps[i - 1] + ps[i]) / 2)
    return {"best_threshold": thr, "best_threshold_accuracy": float(correct[i] / len(ys))}


def ratios(by_set: dict[str, dict[str, Any]], metrics: tuple[str, ...] = METRICS) -> dict[str, dict[str, float]]:
    """pool / reference for every reference trained (``{reference: {metric: ratio}}``); nan where undefined."""
    if "pool" not in by_set:
        return {}
    pool = by_set["pool"]
    out: dict[str, dict[str, float]] = {}
    for ref, sc in by_set.items():
        if ref.startswith("pool"):  # pool and its variants (pool_bn_site) are not references
            continue
        out[ref] = {}
        for m in metrics:
            num, den = pool.get(m), sc.get(m)
            ok = num is not None and den is not None and np.isfinite(num) and np.isfinite(den) and den != 0
            out[ref][m] = float(num / den) if ok else float("nan")
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    """One row per recipe x training set: accuracy, kappa, AUC, ratios to each reference, train seconds."""
    head = (f"{'recipe':<9} {'trained on':<13} {'acc':>6} {'kappa':>6} {'AUC':>6} {'best-thr acc':>12} {'train s':>8}"
            "  pool/ref acc kappa AUC")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        rat = ratios(res.get("scores", {}))
        for ref, sc in res.get("scores", {}).items():
            r = rat.get(ref)
            rtxt = f"  {r['accuracy']:.3f} {r['kappa']:.3f} {r['roc_auc']:.3f}" if r else ""
            bt = sc.get("best_threshold_accuracy")
            lines.append(f"{name:<9} {ref:<13} {sc['accuracy']:>6.3f} {sc['kappa']:>6.3f} {sc['roc_auc']:>6.3f} "
                         f"{(f'{bt:.3f}' if bt is not None else '-'):>12} {res['train_s'].get(ref, float('nan')):>8.1f}{rtxt}")
    return "\n".join(lines)


def prevalence(labels: np.ndarray, num_classes: int) -> list[float]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return (counts / max(int(counts.sum()), 1)).round(4).tolist()


def _train_predict(recipe_name: str, cfg: Any, x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                   k: int, seed: int, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    probs, info, _ = _train_predict_model(recipe_name, cfg, x, y, x_test, k, seed, progress)
    return probs, info


def bn_adapted_probs(recipe_name: str, cfg: Any, model: torch.nn.Module, parts: list[ImageDataset]) -> np.ndarray:
    """The pool model with each site's own BatchNorm statistics (label-free, its real train images;
    plan_shared.classifiers.recalibrate_bn), scored on that site's test split; the sites' probabilities in
    the order of the pooled test set."""
    recipe = make_recipe(recipe_name, cfg.downstream)
    out = []
    for p in parts:
        m = copy.deepcopy(model)
        recalibrate_bn(m, to_tensor(p.train.images))
        out.append(recipe.predict(m, to_tensor(p.test.images)).numpy())
    return np.concatenate(out)


def _train_predict_model(recipe_name: str, cfg: Any, x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                         k: int, seed: int, progress: bool = False
                         ) -> tuple[np.ndarray, dict[str, Any], torch.nn.Module]:
    recipe = make_recipe(recipe_name, cfg.downstream)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    model, info = recipe.train(x, y, k, seed=seed, device="cpu", progress=progress)
    train_s = time.perf_counter() - t0
    probs = recipe.predict(model, x_test).numpy()
    info = {kk: v for kk, v in info.items() if kk != "train_loss"} | {
        "train_s": round(train_s, 2), "n_train": int(len(y)), "seed": seed,
        "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return probs, info, model


def probe(cfg: Any, recipes: list[str], pool_n: int, sets_n: dict[str, int], k: int, x: torch.Tensor,
          y: np.ndarray, n: int) -> dict[str, Any]:
    """Seconds of one epoch of each recipe on ``n`` pool images, extrapolated to every training set."""
    idx = np.random.default_rng(cfg.seed).permutation(len(y))[:n]
    out: dict[str, Any] = {}
    for name in recipes:
        recipe = make_recipe(name, cfg.downstream)
        t0 = time.perf_counter()
        recipe.train(x[idx], y[idx], k, seed=cfg.seed, device="cpu", epochs=1)
        per_img = (time.perf_counter() - t0) / n
        epochs = cfg.downstream.plain.epochs if name == "plain" else cfg.downstream.epochs
        out[name] = {"s_per_epoch_per_image": round(per_img, 5), "epochs": epochs,
                     "estimated_train_s": {s: round(per_img * m * epochs, 1) for s, m in sets_n.items()}}
        print(f"{name}: {per_img * 1000:.1f} ms/image/epoch -> " + ", ".join(
            f"{s} {per_img * m:.0f} s/epoch ({per_img * m * epochs:.0f} s for {epochs})" for s, m in sets_n.items()),
            flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, required=True, help="a pulled pool folder (manifest.json + class folders)")
    ap.add_argument("--config", type=Path, default=None, help="the run's config.yaml (data set, partition, recipes)")
    ap.add_argument("--set", dest="sets_kv", action="append", default=None, help="override a config key, e.g. seed=1")
    ap.add_argument("--recipes", default="phi_down,plain")
    ap.add_argument("--sets", default=",".join(SETS), help=f"training sets, of {', '.join(SETS)}")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the config's seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", type=int, default=0, help="only time one epoch of each recipe on this many pool images")
    ap.add_argument("--progress", action="store_true", help="a tqdm bar per training (epochs) on stderr")
    ap.add_argument("--bn-adapt", action="store_true",
                    help="also score each pool model with every site's own BatchNorm statistics (label-free, from "
                    "its real train images) on that site's test split: score set pool_bn_site")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after every training)")
    a = ap.parse_args()
    from server.downstream import load_pool  # the coordinator's pool loader (flwr: not needed by the pure functions)

    torch.set_num_threads(a.threads)
    recipes = [r for r in a.recipes.split(",") if r]
    sets = [s for s in a.sets.split(",") if s]
    for bad in [r for r in recipes if r not in RECIPES] + [s for s in sets if s not in SETS]:
        raise SystemExit(f"--recipes/--sets: unknown {bad!r} (recipes: {', '.join(RECIPES)}; sets: {', '.join(SETS)})")
    cfg = load_config(a.config, parse_sets(a.sets_kv))
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [cfg.seed]

    full = load_dataset(cfg.data, cfg.seed)
    parts: list[ImageDataset] = partition_dataset(full, cfg.partition, cfg.seed)
    k, c = full.num_classes, full.channels
    pool = load_pool(a.pool, k, c)
    x_pool = to_tensor(pool.images)
    x_real = to_tensor(np.concatenate([p.train.images for p in parts]))
    y_real = np.concatenate([p.train.labels for p in parts])
    x_test = to_tensor(np.concatenate([p.test.images for p in parts]))
    y_test = np.concatenate([p.test.labels for p in parts])
    doc: dict[str, Any] = {
        "pool": str(a.pool), "config": str(a.config), "dataset": full.name, "num_classes": k,
        "seeds": seeds, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
        "settings": {r: (cfg.downstream.plain.model_dump() if r == "plain" else
                         cfg.downstream.model_dump(exclude={"plain", "federated_real", "recipes"})) for r in recipes},
        "n": {"pool": int(len(pool.labels)), "central_real": int(len(y_real)),
              "site_alone": [int(len(p.train)) for p in parts], "test": int(len(y_test))},
        "prevalence": {"pool": prevalence(pool.labels, k), "central_real": prevalence(y_real, k),
                       "test": prevalence(y_test, k),
                       "sites_train": [prevalence(p.train.labels, k) for p in parts],
                       "pool_by_site": {s: prevalence(pool.labels[np.asarray(pool.sites) == s], k)
                                        for s in sorted(set(pool.sites))}},
        "results": {},
    }
    print(f"{full.name}: pool {len(pool.labels)} images {doc['prevalence']['pool']}, central real {len(y_real)} "
          f"{doc['prevalence']['central_real']}, test {len(y_test)} {doc['prevalence']['test']}; seeds {seeds}, "
          f"{a.threads} thread(s), load {doc['load_avg_start']}", flush=True)

    def save() -> None:
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(doc, indent=1))

    if a.probe:
        sizes = {"pool": len(pool.labels), "central_real": len(y_real), "site_alone(all sites)": len(y_real)}
        doc["probe"] = probe(cfg, recipes, len(pool.labels), sizes, k, x_pool, pool.labels, min(a.probe, len(pool.labels)))
        save()
        return

    for seed in seeds:
        for name in recipes:
            key = name if len(seeds) == 1 else f"{name}/seed{seed}"
            res: dict[str, Any] = {"recipe": name, "seed": seed, "scores": {}, "train_s": {}, "info": {}}
            doc["results"][key] = res
            for s in sets:
                if s == "pool":
                    probs, info, model = _train_predict_model(name, cfg, x_pool, pool.labels, x_test, k, seed,
                                                              a.progress)
                    res["scores"]["pool"] = score(y_test, probs, k)
                    if a.bn_adapt:
                        res["scores"]["pool_bn_site"] = score(y_test, bn_adapted_probs(name, cfg, model, parts), k)
                        sc = res["scores"]["pool_bn_site"]
                        print(f"{key} on pool, site BN statistics: acc {sc['accuracy']:.3f} kappa {sc['kappa']:.3f} "
                              f"AUC {sc['roc_auc']:.3f} recall {[round(v, 3) for v in sc['recall']]}", flush=True)
                elif s == "central_real":
                    probs, info = _train_predict(name, cfg, x_real, y_real, x_test, k, seed, a.progress)
                    res["scores"]["central_real"] = score(y_test, probs, k)
                else:  # each site's model on its own test split; the pooled figure over all sites' test images
                    per_site, site_probs, infos = {}, [], []
                    for i, p in enumerate(parts):
                        pr, inf = _train_predict(name, cfg, to_tensor(p.train.images), p.train.labels,
                                                 to_tensor(p.test.images), k, seed, a.progress)
                        per_site[f"site-{i}"] = score(p.test.labels, pr, k)
                        site_probs.append(pr)
                        infos.append(inf)
                    res["scores"]["site_alone"] = score(y_test, np.concatenate(site_probs), k) | {"sites": per_site}
                    info = {"sites": infos, "train_s": round(sum(i["train_s"] for i in infos), 2)}
                res["train_s"][s] = info["train_s"]
                res["info"][s] = info
                sc = res["scores"][s]
                print(f"{key} on {s}: acc {sc['accuracy']:.3f} kappa {sc['kappa']:.3f} AUC {sc['roc_auc']:.3f} "
                      f"recall {[round(v, 3) for v in sc['recall']]} in {info['train_s']:.0f} s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
                res["ratios"] = ratios(res["scores"])
                save()
    doc["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    save()
    print(table(doc["results"]))


if __name__ == "__main__":
    main()
