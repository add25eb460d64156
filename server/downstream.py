"""Stage D at the coordinator: train phi_down on the pulled pool of synthetic images.

The pool folder is what ``plan-server pool pull`` writes (``<class>/<sha256>.png`` +
``manifest.json``). phi_down is trained class-balanced; the epoch kept is the best on a
stratified synthetic validation split (no real image is ever seen here). The state
dict and its architecture travel to the sites, which score it on their real test
splits (federated evaluation).

The downstream references (issue 11 items 4, 5; the site's half is client/fedreal.py):
:func:`train_pool_recipes` trains every recipe of ``downstream.recipes`` on the pool,
:func:`federated_real` trains each with FedAvg over the sites' real train splits (one
``FedRealTask`` per site per round through the one messaging engine, averaged by Flower's
FedAvg), :func:`central_real` (simulation only) on all sites' train splits pooled.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from plan_shared.config import PlanConfig
from plan_shared.data import read_image, to_tensor
from plan_shared.protocol import ConfigRef, FedRealReply, FedRealTask, pool_seed_reference
from plan_shared.recipes import PhiDownRecipe, make_recipe, state_of
from plan_shared.runtime import resolve_device
from server.messaging import Messenger, WaitPolicy

LOG = logging.getLogger("plan.downstream")


@dataclass
class PooledImages:
    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N]
    sites: list[str]
    methods: list[str]
    class_names: list[str]


def load_pool(pool_dir: Path, num_classes: int, channels: int) -> PooledImages:
    """Read a pulled pool; one entry per distinct file (duplicates across bundles counted once)."""
    manifest_path = pool_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no pulled pool here (run `plan-server pool pull` first)")
    doc = json.loads(manifest_path.read_text())
    seen: set[str] = set()
    imgs, labels, sites, methods = [], [], [], []
    class_names = [str(i) for i in range(num_classes)]
    for i, e in enumerate(doc.get("images", [])):
        if e["file"] in seen:
            continue
        seen.add(e["file"])
        label = int(e["label"])
        if not 0 <= label < num_classes:
            raise ValueError(f"{manifest_path}: images[{i}] label {label} outside 0..{num_classes - 1}")
        class_names[label] = e.get("class_name", class_names[label])
        arr = read_image(pool_dir / e["file"])  # (H, W, C)
        if arr.shape[2] != channels:
            raise ValueError(f"{pool_dir / e['file']}: {arr.shape[2]} channels, expected {channels}")
        imgs.append(arr.transpose(2, 0, 1))
        labels.append(label)
        sites.append(e["site_id"])
        methods.append(e["method"])
    if not imgs:
        raise ValueError(f"{manifest_path}: the pool holds no images")
    return PooledImages(np.stack(imgs), np.asarray(labels, dtype=np.int64), sites, methods, class_names)


def train_downstream(
    cfg: PlanConfig, pool: PooledImages, num_classes: int, channels: int, size: int, progress: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """phi_down, class-balanced, epoch selected on a synthetic validation split (the ``phi_down`` recipe)."""
    recipe = PhiDownRecipe(cfg.downstream)
    model, rinfo = recipe.train(to_tensor(pool.images), pool.labels, num_classes, seed=cfg.seed,
                                device=resolve_device(cfg.device), progress=progress)
    counts = np.bincount(pool.labels, minlength=num_classes).tolist()
    info = {
        "n_train": rinfo["n_train"],
        "n_val": rinfo["n_val"],
        "class_counts": counts,
        "best_epoch": rinfo["best_epoch"],
        "synthetic_val_acc": rinfo["val_acc"],
        "arch": downstream_arch(cfg, num_classes, channels, size),
    }
    LOG.info("phi_down trained on %d pooled images (class counts %s), synthetic val acc %s", rinfo["n_train"], counts,
             info["synthetic_val_acc"])
    return model, info


def downstream_arch(cfg: PlanConfig, num_classes: int, channels: int, size: int) -> dict[str, int]:
    """What a site needs to rebuild phi_down from a state dict (sent with the weights)."""
    return {"num_classes": num_classes, "channels": channels, "size": size}


Models = dict[tuple[str, str], dict[str, torch.Tensor]]  # (recipe, reference) -> state dict


def train_pool_recipes(cfg: PlanConfig, pool: PooledImages, num_classes: int,
                       phi_down: torch.nn.Module | None = None) -> tuple[Models, dict[str, Any]]:
    """Every recipe trained on the pool ``downstream.seeds`` times (seeds seed, seed + 1, ...: references
    ``pool``, ``pool_s1``, ...; ``phi_down`` reused as phi_down's first when given); state dicts and what each saw."""
    models: Models = {}
    info: dict[str, Any] = {}
    x = to_tensor(pool.images)
    for name in cfg.downstream.recipes:
        for i in range(cfg.downstream.seeds):
            ref = pool_seed_reference(i)
            t0 = time.perf_counter()
            if i == 0 and name == "phi_down" and phi_down is not None:
                models[(name, ref)] = state_of(phi_down)
                info[name] = {"n_train": int(len(pool.labels)), "reused": "phi_down", "seed": cfg.seed}
                continue
            model, rinfo = make_recipe(name, cfg.downstream).train(x, pool.labels, num_classes, seed=cfg.seed + i,
                                                                   device=resolve_device(cfg.device))
            models[(name, ref)] = state_of(model)
            entry = {**{k: v for k, v in rinfo.items() if k != "train_loss"}, "seed": cfg.seed + i,
                     "train_s": round(time.perf_counter() - t0, 2)}
            if i == 0:
                info[name] = entry
            else:
                info[name].setdefault("seeds", {})[ref] = entry
            LOG.info("recipe %s (seed %d) trained on %d pooled images in %.0f s", name, cfg.seed + i,
                     len(pool.labels), entry["train_s"])
    return models, info


def federated_real(messenger: Messenger, cfg: PlanConfig, node_ids: list[int], arch: dict[str, int],
                   timeout_s: float) -> tuple[Models, dict[str, Any]]:
    """The *federated real* reference of every recipe: ``federated_real.rounds`` of FedAvg over the sites.

    One message per site per round (the global weights); the sites that fail a round are
    left out of its average and named in its record; a round no site completes ends that
    recipe's reference (``complete: false``, no model).
    """
    from flwr.serverapp.strategy import FedAvg

    sec = cfg.downstream.federated_real
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, weighted_by_key=FedRealReply.WEIGHT_KEY)
    models: Models = {}
    info: dict[str, Any] = {"bn": sec.bn, "rounds": sec.rounds, "local_epochs": sec.local_epochs}
    for name in cfg.downstream.recipes:
        recipe = make_recipe(name, cfg.downstream)
        torch.manual_seed(cfg.seed)
        state = state_of(recipe.build(arch["num_classes"], arch["channels"], arch["size"]))
        hist: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        complete = True
        for rnd in range(1, sec.rounds + 1):
            weights = ArrayRecord(state)

            def task(nid: int, ref: ConfigRef, weights: ArrayRecord = weights, rnd: int = rnd,
                     name: str = name) -> FedRealTask:
                return FedRealTask(weights, name, rnd, arch["num_classes"], arch["channels"], arch["size"], ref)

            ex = messenger.exchange(node_ids, task, FedRealReply.from_record, WaitPolicy(timeout_s))
            hist.append({"round": rnd, "sites": sorted(r.site_id for r in ex.replies.values()),
                         "num_examples": sum(r.num_examples for r in ex.replies.values()),
                         "train_s": {r.site_id: r.train_s for r in ex.replies.values()},
                         "failed": {str(n): ex.reason(n, f"no reply within {timeout_s:.0f}s")[:300]
                                    for n in ex.missing()},
                         "collect_s": round(ex.elapsed_s, 2)})
            agg = strategy.aggregate_train(rnd, ex.ordered_messages(lambda r: r.site_id))[0] if ex.messages else None
            if agg is None:
                complete = False
                LOG.error("federated real %s: no site completed round %d: %s", name, rnd, hist[-1]["failed"])
                break
            new = agg.to_torch_state_dict()
            state = {k: new[k].to(v.dtype) for k, v in state.items()}  # num_batches_tracked stays an integer
        info[name] = {"complete": complete, "history": hist, "wall_s": round(time.perf_counter() - t0, 2)}
        if complete:
            models[(name, "federated_real")] = state
        LOG.info("federated real %s: %d round(s), %s", name, len(hist), "complete" if complete else "INCOMPLETE")
    return models, info


def central_real(cfg: PlanConfig, num_classes: int) -> tuple[Models, dict[str, Any]]:
    """Simulation only: every recipe on all virtual sites' train splits pooled (the partition the sites use)."""
    from plan_shared.data import load_dataset
    from plan_shared.partition import partition_dataset

    parts = partition_dataset(load_dataset(cfg.data, cfg.seed), cfg.partition, cfg.seed)
    x = to_tensor(np.concatenate([p.train.images for p in parts]))
    y = np.concatenate([p.train.labels for p in parts])
    models: Models = {}
    info: dict[str, Any] = {}
    for name in cfg.downstream.recipes:
        t0 = time.perf_counter()
        model, _ = make_recipe(name, cfg.downstream).train(x, y, num_classes, seed=cfg.seed,
                                                           device=resolve_device(cfg.device))
        models[(name, "central_real")] = state_of(model)
        info[name] = {"n_train": int(len(y)), "sites": len(parts), "train_s": round(time.perf_counter() - t0, 2)}
    return models, info
