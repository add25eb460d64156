"""Federated evaluation at a site: real images never leave it.

``evaluate_downstream`` scores the coordinator's phi_down on this site's real test
split, next to the reference (same architecture trained on this site's real train
split, epoch selected on its real val split). The privacy audit of the exported
images (the membership attacks) is :mod:`plan_shared.audit`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from plan_shared.classifiers import build_classifier, predict_logits, spec_from, train_classifier
from plan_shared.config import PlanConfig
from plan_shared.data import ImageDataset, to_tensor
from plan_shared.metrics import classification_report

LOG = logging.getLogger("plan.evaluate")


def score_classifier(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray, num_classes: int) -> dict[str, Any]:
    pred = predict_logits(model, x).argmax(1).numpy()
    out: dict[str, Any] = classification_report(y, pred)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, dtype=np.int64), pred), 1)
    out["confusion"] = cm.tolist()
    out["n"] = int(len(y))
    return out


def reference_classifier(cfg: PlanConfig, ds: ImageDataset, progress: bool = False) -> torch.nn.Module:
    """The same architecture as phi_down, trained on this site's real train split."""
    sec = cfg.downstream
    torch.manual_seed(cfg.seed)
    model = build_classifier(ds.num_classes, ds.channels, ds.size, sec)
    spec = spec_from(sec, balanced=True, shift=sec.augment_shift)
    val = (to_tensor(ds.val.images), torch.as_tensor(ds.val.labels)) if len(ds.val) else None
    train_classifier(model, to_tensor(ds.train.images), ds.train.labels, spec, val=val, seed=cfg.seed,
                     desc="reference", progress=progress)
    return model


def load_downstream(cfg: PlanConfig, state: dict[str, torch.Tensor], arch: dict[str, int]) -> torch.nn.Module:
    model = build_classifier(arch["num_classes"], arch["channels"], arch["size"], cfg.downstream)
    model.load_state_dict(state)
    return model.eval()


def evaluate_downstream(
    cfg: PlanConfig, ds: ImageDataset, phi_down: torch.nn.Module, reference: torch.nn.Module | None = None
) -> dict[str, Any]:
    x, y = to_tensor(ds.test.images), ds.test.labels
    out = {"synthetic": score_classifier(phi_down, x, y, ds.num_classes)}
    ref = reference if reference is not None else reference_classifier(cfg, ds)
    out["real"] = score_classifier(ref, x, y, ds.num_classes)
    return out
