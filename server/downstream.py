"""Stage D at the coordinator: train phi_down on the pulled pool of synthetic images.

The pool folder is what ``plan-server pool pull`` writes (``<class>/<sha256>.png`` +
``manifest.json``). phi_down is trained class-balanced; the epoch kept is the best on a
stratified synthetic validation split (no real image is ever seen here). The state
dict and its architecture travel to the sites, which score it on their real test
splits (federated evaluation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plan_shared.classifiers import build_classifier, spec_from, train_classifier
from plan_shared.config import PlanConfig
from plan_shared.data import read_image, stratified_holdout, to_tensor

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
    """phi_down, class-balanced, epoch selected on a synthetic validation split."""
    sec = cfg.downstream
    tr, va = stratified_holdout(pool.labels, sec.val_fraction, cfg.seed)  # plumbing: the one stratified splitter
    x = to_tensor(pool.images)
    y = torch.as_tensor(pool.labels)
    torch.manual_seed(cfg.seed)
    model = build_classifier(num_classes, channels, size, sec)
    spec = spec_from(sec, balanced=True, shift=sec.augment_shift)
    val = (x[va], y[va]) if len(va) else None
    hist = train_classifier(model, x[tr], y[tr], spec, val=val, seed=cfg.seed, desc="phi_down", progress=progress)
    counts = np.bincount(pool.labels, minlength=num_classes).tolist()
    info = {
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "class_counts": counts,
        "best_epoch": hist["best_epoch"],
        "synthetic_val_acc": max(hist["val_acc"]) if hist["val_acc"] else None,
        "arch": downstream_arch(cfg, num_classes, channels, size),
    }
    LOG.info("phi_down trained on %d pooled images (class counts %s), synthetic val acc %s", len(tr), counts,
             info["synthetic_val_acc"])
    return model, info


def downstream_arch(cfg: PlanConfig, num_classes: int, channels: int, size: int) -> dict[str, int]:
    """What a site needs to rebuild phi_down from a state dict (sent with the weights)."""
    return {"num_classes": num_classes, "channels": channels, "size": size}
