"""Why the federated-real reference scored at chance, and which BatchNorm handling fixes it (issue 11 item 5).

Runs the federated-real reference in process, with the same site step as the Flower
phase (client/fedreal.py ``fedreal_round``) and FedAvg as an image-count-weighted mean
(what Flower's FedAvg computes; tests/test_fedreal.py checks that equality), over a
Dirichlet partition of a MedMNIST set; then scores the federated model at each site on its
real test split with ``bn = average`` (the averaged running statistics as they are) and
``bn = recalibrate`` (each site recomputes them on its own train images), next to site
alone and central real of the same recipe. Prints the per-site BatchNorm statistics of
the first layer and the mean logit bias, the diagnosis.

    python benchmarks/fedreal_bn.py --dataset pneumoniamnist --max-train 600 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from client.fedreal import fedreal_round, score_reference
from plan_shared.config import config_from_dict
from plan_shared.data import load_dataset, to_tensor
from plan_shared.partition import partition_dataset
from plan_shared.recipes import make_recipe, state_of


def weighted_mean(states: list[dict[str, torch.Tensor]], counts: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(counts))
    out = {}
    for k, ref in states[0].items():
        mean = sum(s[k].double() * (n / total) for s, n in zip(states, counts))
        out[k] = mean.to(ref.dtype) if ref.is_floating_point() else torch.as_tensor(mean).round().to(ref.dtype)
    return out


def first_bn(model: torch.nn.Module) -> torch.nn.modules.batchnorm._BatchNorm:
    return next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="pneumoniamnist")
    ap.add_argument("--max-train", type=int, default=600)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recipes", default="phi_down,plain")
    ap.add_argument("--plain-epochs", type=int, default=3)
    ap.add_argument("--stem-stride", type=int, default=2)
    ap.add_argument("--plain-lr", type=float, default=None, help="the plain recipe's SGD learning rate (default: the config's)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = config_from_dict({
        "device": "cpu", "threads": 1,
        "data": {"name": a.dataset, "max_train": a.max_train},
        "partition": {"scheme": "dirichlet", "alpha": a.alpha, "sites": a.sites},
        "downstream": {"plain": {"epochs": a.plain_epochs, "stem_stride": a.stem_stride,
                                 **({"lr": a.plain_lr} if a.plain_lr else {})},
                       "federated_real": {"rounds": a.rounds}},
    })
    full = load_dataset(cfg.data, cfg.seed)
    sites = partition_dataset(full, cfg.partition, cfg.seed)
    k, c, s = full.num_classes, full.channels, full.size
    avg_cfg = cfg.model_copy(update={"downstream": cfg.downstream.model_copy(update={
        "federated_real": cfg.downstream.federated_real.model_copy(update={"bn": "average"})})})
    results: dict[str, dict] = {}
    for name in a.recipes.split(","):
        recipe = make_recipe(name, cfg.downstream)
        torch.manual_seed(cfg.seed)
        state = state_of(recipe.build(k, c, s))
        t0 = time.perf_counter()
        for rnd in range(1, a.rounds + 1):
            outs = [fedreal_round(cfg, ds, f"site-{i}", name, state, {"num_classes": k, "channels": c, "size": s}, rnd)
                    for i, ds in enumerate(sites)]
            state = weighted_mean([o[0] for o in outs], [o[1] for o in outs])
        fed_s = time.perf_counter() - t0
        x_all = to_tensor(np.concatenate([d.train.images for d in sites]))
        y_all = np.concatenate([d.train.labels for d in sites])
        central, _ = recipe.train(x_all, y_all, k, seed=cfg.seed)
        rows = {}
        model = recipe.build(k, c, s)
        model.load_state_dict(state)
        bn_avg = first_bn(model)
        for i, ds in enumerate(sites):
            alone, _ = recipe.train(to_tensor(ds.train.images), ds.train.labels, k, seed=cfg.seed)
            with torch.no_grad():  # the diagnosis: this site's own first-layer statistics vs the averaged ones
                probe = recipe.build(k, c, s)
                probe.load_state_dict(state)
                from plan_shared.classifiers import recalibrate_bn

                recalibrate_bn(probe, to_tensor(ds.train.images))
                own = first_bn(probe)
                logits_avg = model.eval()(to_tensor(ds.test.images)).mean(0).tolist()
                logits_own = probe.eval()(to_tensor(ds.test.images)).mean(0).tolist()
            rows[f"site-{i}"] = {
                "n_train": len(ds.train), "class_counts": np.bincount(ds.train.labels, minlength=k).tolist(),
                "site_alone": score_reference(cfg, ds, name, "pool", state_of(alone)).accuracy,
                "federated_average_bn": score_reference(avg_cfg, ds, name, "federated_real", state).accuracy,
                "federated_recalibrated_bn": score_reference(cfg, ds, name, "federated_real", state).accuracy,
                "central_real": score_reference(cfg, ds, name, "pool", state_of(central)).accuracy,
                "bn0_mean_averaged_vs_own": [float(bn_avg.running_mean.mean()), float(own.running_mean.mean())],
                "bn0_var_averaged_vs_own": [float(bn_avg.running_var.mean()), float(own.running_var.mean())],
                "mean_logits_averaged_vs_own": [logits_avg, logits_own],
            }
        results[name] = {"federated_s": round(fed_s, 1), "sites": rows}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
