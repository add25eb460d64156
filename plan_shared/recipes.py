"""Downstream recipes: how a classifier is trained on a set of images, behind one interface.

The pool's utility means something only against the same recipe trained on real data, so
every comparison (pool, site alone, federated real, central real) goes through one
:class:`Recipe` (``downstream.recipes`` names those in use)::

    recipe = make_recipe("plain", cfg.downstream)
    model, info = recipe.train(x, y, num_classes, seed=0)
    probs = recipe.predict(model, x_test)        # [N, num_classes] softmax, on the CPU

- ``phi_down``: the pipeline's own classifier (``downstream`` section): class-balanced
  sampling, AdamW + cosine, and the epoch kept is the best on a stratified held-out part of
  its training images (synthetic validation when it is trained on the pool).
- ``plain``: torchvision ResNet-18 adapted to small images (3x3 stem, no max-pool at
  <= 32 px), fixed epochs of SGD (Nesterov) with a cosine schedule, random translation
  only; no validation selection, no class balancing (``downstream.plain``); BatchNorm
  statistics recomputed over its training images at the end (label-free).

Images are float tensors ``[N, C, H, W]`` in [-1, 1] (``plan_shared.data.to_tensor``).
``train(..., init_state=w, epochs=1)`` continues from the weights ``w`` for one epoch: a
site's local step of the federated-real reference (client/fedreal.py); both recipes end it
with BatchNorm statistics recomputed exactly over its images, so FedAvg averages exact
statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plan_shared import progress as P
from plan_shared.classifiers import (
    TrainSpec,
    augment_batch,
    build_classifier,
    predict_logits,
    recalibrate_bn,
    spec_from,
    train_classifier,
)
from plan_shared.config import DownstreamConfig, PlainRecipeConfig
from plan_shared.data import stratified_holdout

RECIPES = ("phi_down", "plain")
State = dict[str, torch.Tensor]


class Recipe(Protocol):
    """A downstream training recipe (see the module docstring)."""

    name: str

    def build(self, num_classes: int, channels: int, size: int) -> nn.Module: ...

    def train(self, x: torch.Tensor, y: torch.Tensor | np.ndarray, num_classes: int, seed: int,
              device: torch.device | str = "cpu", progress: bool = False, init_state: State | None = None,
              epochs: int | None = None) -> tuple[nn.Module, dict[str, Any]]: ...

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...


def check_xy(name: str, x: torch.Tensor, y: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """The labels as a long tensor; ValueError naming the recipe when images and labels do not fit."""
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if x.ndim != 4 or len(x) != len(yt):
        raise ValueError(f"recipe {name}: need images [N, C, H, W] and N labels, got {tuple(x.shape)} and {len(yt)}")
    if len(yt) < 2:
        raise ValueError(f"recipe {name}: need at least 2 training images, got {len(yt)}")
    if int(yt.min()) < 0 or int(yt.max()) >= num_classes:
        raise ValueError(f"recipe {name}: labels must lie in 0..{num_classes - 1}, got {int(yt.min())}..{int(yt.max())}")
    return yt


def softmax_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(predict_logits(model.cpu().eval(), x), dim=1)


def state_of(model: nn.Module) -> State:
    """A detached CPU copy of the model's weights and buffers."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class PhiDownRecipe:
    """The pipeline's phi_down: class-balanced, epoch selected on a held-out part of its training set."""

    sec: DownstreamConfig
    name: str = "phi_down"

    def build(self, num_classes: int, channels: int, size: int) -> nn.Module:
        return build_classifier(num_classes, channels, size, self.sec)

    def train(self, x: torch.Tensor, y: torch.Tensor | np.ndarray, num_classes: int, seed: int,
              device: torch.device | str = "cpu", progress: bool = False, init_state: State | None = None,
              epochs: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
        yt = check_xy(self.name, x, y, num_classes)
        # A local FedAvg step (init_state) trains on all its images: selecting an epoch needs more than one.
        if init_state is None:
            tr, va = stratified_holdout(yt.numpy(), self.sec.val_fraction, seed)
        else:
            tr, va = np.arange(len(yt)), np.zeros(0, dtype=np.int64)
        torch.manual_seed(seed)
        model = self.build(num_classes, x.shape[1], x.shape[2])
        if init_state is not None:
            model.load_state_dict(init_state)
        model = model.to(device)
        spec = spec_from(self.sec, balanced=True, shift=self.sec.augment_shift, epochs=epochs or self.sec.epochs)
        val = (x[va], yt[va]) if len(va) else None
        hist = train_classifier(model, x[tr], yt[tr], spec, val=val, seed=seed, desc="phi_down", progress=progress)
        if init_state is not None:  # a FedAvg local step sends the exact statistics of its images, not a lagging EMA
            recalibrate_bn(model, x)
        info = {"n_train": int(len(tr)), "n_val": int(len(va)), "best_epoch": hist["best_epoch"],
                "val_acc": max(hist["val_acc"]) if hist["val_acc"] else None}
        return model.cpu().eval(), info

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return softmax_probs(model, x)


def resnet18_small(num_classes: int, channels: int, size: int, stem_stride: int = 1) -> nn.Module:
    """torchvision ResNet-18 (random init); at <= 32 px a 3x3 stem (stride ``stem_stride``) without max-pool."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if size <= 32:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    out: nn.Module = model
    return out


@dataclass
class PlainRecipe:
    """ResNet-18 trained plainly: fixed epochs, SGD + cosine, translation only, no selection, no balancing."""

    sec: PlainRecipeConfig
    name: str = "plain"

    def build(self, num_classes: int, channels: int, size: int) -> nn.Module:
        return resnet18_small(num_classes, channels, size, self.sec.stem_stride)

    def train(self, x: torch.Tensor, y: torch.Tensor | np.ndarray, num_classes: int, seed: int,
              device: torch.device | str = "cpu", progress: bool = False, init_state: State | None = None,
              epochs: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
        yt = check_xy(self.name, x, y, num_classes)
        sec = self.sec
        n_epochs = epochs or sec.epochs
        torch.manual_seed(seed)
        model = self.build(num_classes, x.shape[1], x.shape[2])
        if init_state is not None:
            model.load_state_dict(init_state)
        model = model.to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.SGD(model.parameters(), lr=sec.lr, momentum=sec.momentum, nesterov=sec.momentum > 0,
                              weight_decay=sec.weight_decay)
        n = len(yt)
        bs = min(sec.batch_size, n)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(n_epochs * math.ceil(n / bs), 1))
        spec = TrainSpec(shift=sec.augment_shift)
        losses: list[float] = []
        for _ in P.bar(range(n_epochs), desc="plain", unit="epochs", show=progress):
            model.train()
            order = torch.randperm(n, generator=gen)
            tot, cnt = 0.0, 0
            for i in range(0, n, bs):
                idx = order[i : i + bs]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                xb = augment_batch(x[idx], spec, gen).to(device)
                loss = F.cross_entropy(model(xb), yt[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(idx)
                cnt += len(idx)
            losses.append(tot / max(cnt, 1))
        if sec.recalibrate_bn:
            recalibrate_bn(model, x)
        return model.cpu().eval(), {"n_train": int(n), "epochs": int(n_epochs), "train_loss": losses}

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return softmax_probs(model, x)


def make_recipe(name: str, sec: DownstreamConfig) -> Recipe:
    """The recipe called ``name``, configured from the ``downstream`` section."""
    if name == "phi_down":
        return PhiDownRecipe(sec)
    if name == "plain":
        return PlainRecipe(sec.plain)
    raise ValueError(f"downstream.recipes: unknown recipe {name!r} (known: {', '.join(RECIPES)})")

