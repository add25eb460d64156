"""The re-identification attacker of a privacy review (issue #11.1 (b), (c)).

A model that neither navigation (phi_id) nor the filter (the independent identity model)
uses: a different architecture -- a small residual network (ResNet-18's BasicBlock with
identity shortcuts, a 3x3 stride-1 stem for 28-64 px images, three stages) instead of
plan_shared.models.Classifier's plain CNN -- trained by its own recipe: Adam with a cosine
decay (no warm-up), a CosFace (additive cosine margin) head over one class per identity,
random crops from zero padding, random erasing and gamma jitter (phi_id trains with AdamW
and a one-cycle schedule on reflect shifts, 3x3 blur, noise and contrast, no margin). Plain
SGD did not train the cosine head in 25 epochs on 24 identities (29 % top-1; Adam 100 %). The question it answers:
does an image that navigation made "unrecognisable" to phi_id still point to its patient
for someone who trained their own model?

    att = train_attacker(x_train, identity_labels, cfg.audit.attacker, device, progress=False)
    p = max_id_prob(att, images)        # [N] max softmax over the identities (scale s applied)
    e = embed(att, images)              # [N, feature_dim], L2-normalised (DCR in its space)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plan_shared import progress as P
from plan_shared.config import AttackerConfig


class _Block(nn.Module):
    """ResNet BasicBlock: two 3x3 convs with BatchNorm, identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class Attacker(nn.Module):
    """Residual feature net + cosine classifier over identities (logits = scale * cos)."""

    def __init__(self, n_ids: int, channels: int, cfg: AttackerConfig) -> None:
        super().__init__()
        w = cfg.width
        self.n_ids, self.scale, self.margin = n_ids, float(cfg.scale), float(cfg.margin)
        self.stem = nn.Sequential(nn.Conv2d(channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        layers: list[nn.Module] = []
        cin = w
        for i, nb in enumerate(cfg.blocks):
            cout = w << i
            for j in range(nb):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, cfg.feature_dim)
        self.weight = nn.Parameter(torch.randn(n_ids, cfg.feature_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.stem(x))
        out: torch.Tensor = self.proj(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return out

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=1) @ F.normalize(self.weight, dim=1).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits (no margin)."""
        return self.scale * self.cosine(x)


def _augment(x: torch.Tensor, cfg: AttackerConfig, gen: torch.Generator) -> torch.Tensor:
    """The attacker's own augmentations: crop from zero padding, gamma jitter, random erasing."""
    b, _c, h, w = x.shape
    dev = x.device
    if cfg.crop_pad > 0:
        s = cfg.crop_pad
        pad = F.pad(x, (s, s, s, s), value=-1.0)
        dy = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
        dx = torch.randint(0, 2 * s + 1, (b,), generator=gen).tolist()
        x = torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if cfg.gamma > 0:
        g = torch.exp((torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * cfg.gamma).to(dev)
        x = ((x + 1) / 2).clamp(0, 1).pow(g) * 2 - 1
    if cfg.erase_p > 0:
        keep = torch.ones_like(x)
        for i in torch.nonzero(torch.rand(b, generator=gen) < cfg.erase_p).flatten().tolist():
            eh = int(torch.randint(h // 8, h // 3 + 1, (1,), generator=gen))
            ew = int(torch.randint(w // 8, w // 3 + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - eh + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, w - ew + 1, (1,), generator=gen))
            keep[i, :, y0 : y0 + eh, x0 : x0 + ew] = 0
        x = x * keep
    return x


def train_attacker(
    x: torch.Tensor, ids: torch.Tensor, cfg: AttackerConfig, device: torch.device | str, progress: bool = True
) -> Attacker:
    """Train the attacker on images ``x [N, C, H, W]`` in [-1, 1] with one class per identity ``ids [N]``."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if x.ndim != 4 or len(x) != len(ids):
        raise ValueError(f"train_attacker: x must be [N, C, H, W] with one identity per image, got x {tuple(x.shape)}, "
                         f"ids {tuple(ids.shape)}")
    if len(x) < 2:
        raise ValueError(f"train_attacker: needs at least 2 images, got {len(x)}")
    n_ids = int(ids.max()) + 1
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    model = Attacker(n_ids, x.shape[1], cfg).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(x))
    steps = cfg.epochs * max(1, len(x) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = P.bar(range(cfg.epochs), desc="attacker", unit="epochs", show=progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - bs + 1, bs):
            idx = order[i : i + bs]
            xb = _augment(x[idx], cfg, gen).to(dev)
            yb = ids[idx].to(dev)
            cos = model.cosine(xb)
            logits = model.scale * (cos - model.margin * F.one_hot(yb, n_ids).to(cos.dtype))
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    _recalibrate(model, x)
    return model.eval()


@torch.no_grad()
def _recalibrate(model: Attacker, x: torch.Tensor, batch: int = 256) -> None:
    """BatchNorm statistics as the exact mean over the clean training images (eval mode = train images)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        if len(x[i : i + batch]) >= 2:
            model.features(x[i : i + batch].to(dev))
    for m in bns:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def max_id_prob(att: Attacker, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``[N]`` the attacker's largest identity probability per image (on CPU)."""
    att.eval()
    dev = next(att.parameters()).device
    out = [torch.softmax(att(x[i : i + batch].to(dev)).float(), 1).max(1).values.cpu() for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def predict_ids(att: Attacker, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``[N]`` the attacker's most likely identity per image (on CPU)."""
    att.eval()
    dev = next(att.parameters()).device
    out = [att(x[i : i + batch].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def embed(att: Attacker, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """``[N, feature_dim]`` L2-normalised attacker features (on CPU): the space of DCR (c)."""
    att.eval()
    dev = next(att.parameters()).device
    out = [F.normalize(att.features(x[i : i + batch].to(dev)).float(), dim=1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, att.proj.out_features)
