"""The site's half of the downstream references: real images stay here, only weights and numbers leave.

- :func:`fedreal_round`: one round of the *federated real* reference (FedAvg of a
  downstream recipe over the sites' real train splits; the coordinator's half is
  server/downstream.py): the global weights in, ``downstream.federated_real.local_epochs``
  of the recipe on this site's real train split, its weights and image count out.
- :func:`evaluate_references`: every recipe's models on this site's real test split: the
  pool-trained model, *site alone* (the same recipe trained here on this site's own train
  split), *federated real* and, in simulation, *central real*. phi_down's *site alone* is
  the evaluation phase's real reference (client/evaluate.py ``reference_classifier``, the
  same recipe), so it is not trained a second time here.

Each local step ends with BatchNorm statistics recomputed exactly over the site's train
images (plan_shared/recipes.py), so FedAvg averages exact statistics; with
``downstream.federated_real.bn = recalibrate`` a site also recomputes them on its own train
images before it scores the federated model (measured worse than ``average``, the default).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch

from client.evaluate import score_classifier
from plan_shared.classifiers import recalibrate_bn
from plan_shared.config import PlanConfig
from plan_shared.data import ImageDataset, to_tensor
from plan_shared.protocol import ClassifierScore, ReferenceEvaluation
from plan_shared.recipes import make_recipe, state_of
from plan_shared.runtime import resolve_device

LOG = logging.getLogger("plan.fedreal")


def check_arch(site_id: str, ds: ImageDataset, arch: Mapping[str, int]) -> None:
    """ValueError naming the site when the coordinator's models do not fit this site's data."""
    have = {"num_classes": ds.num_classes, "channels": ds.channels, "size": ds.size}
    if any(int(arch[k]) != v for k, v in have.items()):
        raise ValueError(f"{site_id}: the downstream models expect {dict(arch)}, the site's data are {have}")


def fedreal_round(cfg: PlanConfig, ds: ImageDataset, site_id: str, recipe_name: str,
                  state: dict[str, torch.Tensor], arch: Mapping[str, int],
                  rnd: int) -> tuple[dict[str, torch.Tensor], int, float]:
    """The recipe from the global ``state``, trained on the site's real train split: (weights, n images, seconds)."""
    check_arch(site_id, ds, arch)
    t0 = time.perf_counter()
    recipe = make_recipe(recipe_name, cfg.downstream)
    model, _ = recipe.train(to_tensor(ds.train.images), ds.train.labels, ds.num_classes, seed=cfg.seed + 7919 * rnd,
                            device=resolve_device(cfg.device), init_state=state,
                            epochs=cfg.downstream.federated_real.local_epochs)
    train_s = round(time.perf_counter() - t0, 2)
    n = len(ds.train.labels)
    LOG.info("%s: federated-real %s round %d, %d images, %.1f s", site_id, recipe_name, rnd, n, train_s)
    return state_of(model), n, train_s


def score_reference(cfg: PlanConfig, ds: ImageDataset, recipe_name: str, reference: str,
                    state: dict[str, torch.Tensor]) -> ClassifierScore:
    """A model trained away from the site (pool, federated real, central real) on the site's real test split.

    The federated model gets this site's own BatchNorm statistics first when
    ``downstream.federated_real.bn`` is ``recalibrate`` (label-free, the site's train images).
    """
    k = ds.num_classes
    model = make_recipe(recipe_name, cfg.downstream).build(k, ds.channels, ds.size)
    model.load_state_dict(state)
    if reference == "federated_real" and cfg.downstream.federated_real.bn == "recalibrate":
        recalibrate_bn(model, to_tensor(ds.train.images))
    return ClassifierScore.from_dict(score_classifier(model.eval(), to_tensor(ds.test.images), ds.test.labels, k), k)


def evaluate_references(cfg: PlanConfig, ds: ImageDataset, site_id: str,
                        models: Mapping[tuple[str, str], dict[str, torch.Tensor]], recipes: tuple[str, ...],
                        arch: Mapping[str, int]) -> ReferenceEvaluation:
    """Every recipe's models (plus *site alone*, trained here) scored on the site's real test split."""
    check_arch(site_id, ds, arch)
    t0 = time.perf_counter()
    x_tr = to_tensor(ds.train.images)
    x_te, y_te = to_tensor(ds.test.images), ds.test.labels
    k = ds.num_classes
    scores: dict[tuple[str, str], ClassifierScore] = {}
    for name in recipes:
        if name != "phi_down":  # phi_down's site alone: the evaluation phase's reference (SiteEvaluation.real)
            recipe = make_recipe(name, cfg.downstream)
            alone, _ = recipe.train(x_tr, ds.train.labels, k, seed=cfg.seed, device=resolve_device(cfg.device))
            scores[(name, "site_alone")] = ClassifierScore.from_dict(score_classifier(alone, x_te, y_te, k), k)
        for (r, ref), state in models.items():
            if r == name:
                scores[(name, ref)] = score_reference(cfg, ds, name, ref, state)
        LOG.info("%s: recipe %s accuracy %s", site_id, name,
                 {ref: sc.accuracy for (r, ref), sc in scores.items() if r == name})
    return ReferenceEvaluation(site_id, int(k), round(time.perf_counter() - t0, 2), scores)
