"""Training loops for the classifiers of the pipeline: phi_id, phi_class, the independent
identity model and the downstream / utility classifier.

Generic: every function takes float image tensors ``[N, C, H, W]`` in [-1, 1] and integer
labels, and a :class:`TrainSpec` (plain values, so any config section can feed it)::

    spec = TrainSpec(epochs=8, batch_size=64, lr=2e-3)
    model = Classifier(2, channels=1, size=32)
    hist = train_classifier(model, x_train, y_train, spec, val=(x_val, y_val), seed=0)
    acc = accuracy_of(model, x_test, y_test)

Augmentation (:func:`augment_batch`) is random translation, Gaussian noise, an optional
3x3 blur and brightness/contrast jitter; the identity classifier uses it strongly so that
it still recognises GAN renderings of near-copies of a training image.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plan_shared import progress as P
from plan_shared.config import ClassifierConfig, IdentityConfig
from plan_shared.models import Classifier

LOG = logging.getLogger("plan.classifiers")


@dataclass
class TrainSpec:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: float = 0.0  # translation, fraction of the size
    noise: float = 0.0  # additive Gaussian std
    blur: float = 0.0  # probability of a 3x3 box blur
    contrast: float = 0.0  # brightness/contrast jitter amplitude
    balanced: bool = False  # class-balanced sampling (utility classifier on skewed synthetic sets)


def spec_from(section: ClassifierConfig, **over: Any) -> TrainSpec:
    """A TrainSpec from a classifier config section (``identity``, ``classes``, ``downstream``) plus overrides.

    Only ``identity`` has noise/blur/contrast augmentation; the other sections train without.
    """
    kw: dict[str, Any] = dict(
        epochs=section.epochs,
        batch_size=section.batch_size,
        lr=section.lr,
        weight_decay=section.weight_decay,
        shift=section.augment_shift,
    )
    if isinstance(section, IdentityConfig):
        kw.update(noise=section.augment_noise, blur=section.augment_blur, contrast=section.augment_contrast)
    kw.update(over)
    return TrainSpec(**kw)


def augment_batch(x: torch.Tensor, spec: TrainSpec, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random translation (reflect padding), blur, brightness/contrast and noise; shapes kept."""
    b, c, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=gen).to(dev)

    if spec.shift > 0:
        s = max(1, int(round(h * spec.shift)))
        pad = F.pad(x, (s, s, s, s), mode="reflect") if s < h else F.pad(x, (s, s, s, s), mode="replicate")
        dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
        # gather crops with one unfold-free index trick
        iy = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(dev)  # [b, h]
        ix = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(dev)  # [b, w]
        rows = torch.gather(pad, 2, iy.view(b, 1, h, 1).expand(b, c, h, pad.shape[3]))
        x = torch.gather(rows, 3, ix.view(b, 1, 1, w).expand(b, c, h, w))
    if spec.blur > 0:
        k = torch.full((c, 1, 3, 3), 1.0 / 9.0, device=dev, dtype=x.dtype)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=c)
        m = (rand(b, 1, 1, 1) < spec.blur).to(x.dtype)
        x = m * blurred + (1 - m) * x
    if spec.contrast > 0:
        a = 1 + (rand(b, 1, 1, 1) * 2 - 1) * spec.contrast
        bb = (rand(b, 1, 1, 1) * 2 - 1) * spec.contrast * 0.5
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * a + mean + bb
    if spec.noise > 0:
        x = x + torch.randn(x.shape, generator=gen).to(dev) * spec.noise
    return x.clamp(-1.5, 1.5)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 512, device: torch.device | str | None = None) -> torch.Tensor:
    """Logits ``[N, classes]`` on CPU (eval mode, batched)."""
    model.eval()
    dev = device or next(model.parameters()).device
    out = [model(x[i : i + batch].to(dev)).float().cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, getattr(model, "num_classes", 0))


@torch.no_grad()
def embed(model: Classifier, x: torch.Tensor, batch: int = 512, normalise: bool = True) -> torch.Tensor:
    """Features ``[N, feature_dim]`` on CPU, L2-normalised by default (the distance space)."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, x.shape[0], batch):
        f = model.features(x[i : i + batch].to(dev)).float().cpu()
        out.append(F.normalize(f, dim=1) if normalise else f)
    return torch.cat(out) if out else torch.zeros(0, model.feature_dim)


def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor | np.ndarray) -> float:
    if len(x) == 0:
        return float("nan")
    pred = predict_logits(model, x).argmax(1)
    return float((pred == torch.as_tensor(y)).float().mean())


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    spec: TrainSpec,
    val: tuple[torch.Tensor, torch.Tensor | np.ndarray] | None = None,
    seed: int = 0,
    desc: str = "classifier",
    progress: bool = True,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW + cosine schedule + label-free augmentation.

    With ``val`` the weights of the epoch with the best val accuracy are kept
    (selection on val); returns ``{"epochs", "train_loss", "val_acc", "best_epoch"}``.
    """
    y = torch.as_tensor(y, dtype=torch.long)
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"{desc}: no training images")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    bs = min(spec.batch_size, n)
    steps_per_epoch = max(1, (n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch, pct_start=0.15
    )
    if spec.balanced:
        counts = torch.bincount(y, minlength=int(y.max()) + 1).float().clamp(min=1)
        weights = (1.0 / counts)[y]
    hist: dict[str, Any] = {"epochs": spec.epochs, "train_loss": [], "val_acc": [], "best_epoch": None}
    best, best_state = -1.0, None
    bar = P.bar(range(spec.epochs), desc=desc, unit="epochs", show=progress)
    for ep in bar:
        model.train()
        if spec.balanced:
            order = torch.multinomial(weights, n, replacement=True, generator=gen)
        else:
            order = torch.randperm(n, generator=gen)
        tot, cnt = 0.0, 0
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = augment_batch(x[idx].to(dev), spec, gen)
            loss = F.cross_entropy(model(xb), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        hist["train_loss"].append(tot / max(cnt, 1))
        post = {"loss": f"{hist['train_loss'][-1]:.3f}"}
        if val is not None and len(val[0]):
            acc = accuracy_of(model, val[0], val[1])
            hist["val_acc"].append(acc)
            post["val_acc"] = f"{acc:.3f}"
            if acc > best:
                best, best_state = acc, copy.deepcopy(model.state_dict())
                hist["best_epoch"] = ep
        bar.set_postfix(post, refresh=False)
    if best_state is not None:
        model.load_state_dict(best_state)
    if recalibrate:
        recalibrate_bn(model, x)
    model.eval()
    return hist


def build_classifier(num_classes: int, channels: int, size: int, section: ClassifierConfig, head: str = "linear",
                     width: int | None = None) -> Classifier:
    """A :class:`Classifier` from a classifier config section (``identity`` / ``classes`` / ``downstream``)."""
    depth = section.depth
    while depth > 1 and size >> depth < 1:
        depth -= 1
    return Classifier(
        num_classes,
        channels=channels,
        size=size,
        width=width or section.width,
        depth=depth,
        feature_dim=section.feature_dim,
        head=head,  # type: ignore[arg-type]
        pool_grid=section.pool_grid if isinstance(section, IdentityConfig) else 1,
    )


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch: int = 256) -> None:
    """Recompute every BatchNorm's running statistics as the exact average over ``x``
    (clean images, train-mode forward, no gradient). With thousands of near-identical
    classes (phi_id) the lagging EMA statistics otherwise cost most of the eval-mode
    accuracy (measured: 64 % train-mode vs 11 % eval-mode top-1 before recalibration)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) < 2:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = exact mean over the passes
    model.train()
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        if len(xb) >= 2:
            model(xb.to(dev))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


@torch.no_grad()
def augmented_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec, seed: int = 0) -> float:
    """Accuracy on one augmented view of each image (how phi_id is reported)."""
    gen = torch.Generator().manual_seed(seed)
    xa = torch.cat([augment_batch(x[i : i + 512], spec, gen) for i in range(0, len(x), 512)])
    return accuracy_of(model, xa, y)
