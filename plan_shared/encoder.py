"""B3 learned encoder E: image -> w, the starting point of inversion (config ``inversion.encoder``).

E is a small strided CNN trained on the generator's OWN samples only (z -> w -> G(w)); no real
image is needed, so it can be trained by the coordinator and shipped with G, or at the site.
The loss is the squared W error in units of sigma_W (:func:`plan_shared.navigation.w_std`),
optionally plus ``pixel_weight`` x the pixel MSE of G(E(x)) vs x. Inversion then starts from
E(x) and refines with a few steps of its own loss (:func:`plan_shared.inversion.invert`)::

    E = train_encoder(G, cfg.inversion.encoder, device, progress=False, seed=cfg.seed)
    w0 = encode(E, images)                      # [N, w_dim] on CPU
    save_encoder(E, "encoder.pt", generator_digest(G))

E predicts the offset from w_avg in units of sigma_W, so an untrained E starts near w_avg.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from plan_shared import progress as P
from plan_shared.config import EncoderConfig, InversionConfig
from plan_shared.inversion import FeatureNet, inversion_loss, reconstruction_losses
from plan_shared.navigation import w_std

FORMAT = "plan-encoder/2"  # /1 (before stop 24) kept the metadata at the top level: such a file is retrained
LOG = logging.getLogger("plan.encoder")


class Renderer(Protocol):
    """What the encoder needs of a generator (plan_shared.models.StyleGenerator)."""

    w_dim: int
    size: int
    channels: int

    @property
    def w_avg(self) -> torch.Tensor: ...

    def render(self, w: torch.Tensor, noise_mode: str = "const") -> torch.Tensor: ...

    def sample_w(self, n: int, generator: torch.Generator | None = None, truncation: float = 1.0) -> torch.Tensor: ...


@dataclass
class EncoderStats:
    """What training cost and reached (report keys of the pipeline and the benchmark)."""

    steps: int
    batch: int
    generator_evals: int  # G forward passes on samples (+ one forward+backward per sample with pixel_weight > 0)
    seconds: float
    final_w_loss: float  # mean squared W error / sigma_W^2 over the last 10 % of steps

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch": self.batch, "generator_evals": self.generator_evals,
                "train_seconds": round(self.seconds, 2), "final_w_loss": self.final_w_loss}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderStats:
        """The inverse of :meth:`as_dict` (KeyError / ValueError on a missing or bad value)."""
        return cls(int(d["steps"]), int(d["batch"]), int(d["generator_evals"]), float(d["train_seconds"]),
                   float(d["final_w_loss"]))


def _native(size: int) -> int:
    if size < 8:
        raise ValueError(f"encoder: image size {size} is below the minimum of 8")
    return 1 << math.ceil(math.log2(size))


class Encoder(nn.Module):
    """Strided CNN: stem conv, one stride-2 conv stage per halving down to 4x4, a 1x1 squeeze, an MLP head.

    ``forward(x)`` maps images ``[B, C, size, size]`` in [-1, 1] to W vectors ``[B, w_dim]``.
    """

    def __init__(self, channels: int, size: int, w_dim: int, width: int, w_avg: torch.Tensor, sigma_w: float):
        super().__init__()
        if w_avg.shape != (w_dim,):
            raise ValueError(f"encoder: w_avg must have shape ({w_dim},), got {tuple(w_avg.shape)}")
        if not sigma_w > 0:
            raise ValueError(f"encoder: sigma_w must be > 0, got {sigma_w}")
        self.channels, self.size, self.w_dim, self.width = channels, size, w_dim, width
        self.native = _native(size)
        n_down = int(math.log2(self.native)) - 2
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(n_down):
            c_out = min(width << (i + 1), width * 4)
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = c_out
        layers += [nn.Conv2d(c, width, 1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        hidden = 4 * w_dim
        last = nn.Linear(hidden, w_dim)
        nn.init.zeros_(last.weight)  # untrained: E(x) = w_avg
        nn.init.zeros_(last.bias)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, hidden), nn.LeakyReLU(0.2), last)
        self.register_buffer("w_avg", w_avg.detach().clone().float())
        self.register_buffer("sigma_w", torch.tensor(float(sigma_w)))
        self.stats: EncoderStats | None = None  # set by train_encoder / load_encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(
                f"encoder expects images [B, {self.channels}, {self.size}, {self.size}], got {tuple(x.shape)}"
            )
        if self.native != self.size:
            x = F.interpolate(x, size=(self.native, self.native), mode="bilinear", align_corners=False)
        out: torch.Tensor = self.w_avg + self.sigma_w * self.head(self.body(x))
        return out


def n_parameters(E: nn.Module) -> int:
    return sum(p.numel() for p in E.parameters())


def train_encoder(
    G: Renderer,
    cfg: EncoderConfig,
    device: torch.device | str,
    progress: bool = True,
    seed: int = 0,
    sigma_w: float | None = None,
) -> Encoder:
    """Train E on ``cfg.steps`` batches of ``cfg.batch`` fresh generator samples; returns E in eval mode.

    ``sigma_w`` (default: measured with :func:`w_std`) normalises the W loss. The training
    statistics are on ``E.stats`` (:class:`EncoderStats`). G is not changed.
    """
    dev = torch.device(device)
    sigma = float(sigma_w) if sigma_w is not None else w_std(G, seed=seed)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    E = Encoder(G.channels, G.size, G.w_dim, cfg.width, G.w_avg.detach().cpu(), sigma).to(dev)
    opt = torch.optim.Adam(E.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(seed + 1)
    tail = max(1, cfg.steps // 10)
    tail_losses: list[torch.Tensor] = []
    t0 = time.perf_counter()
    bar = P.bar(range(cfg.steps), desc="encoder", unit="steps", show=progress)
    E.train()
    for step in bar:
        with torch.no_grad():
            w = G.sample_w(cfg.batch, gen).to(dev)
            x = G.render(w, noise_mode=cfg.train_noise_mode)
            if cfg.augment_noise > 0:
                s = torch.rand(cfg.batch, 1, 1, 1, generator=gen) * cfg.augment_noise
                x = (x + s.to(dev) * torch.randn(x.shape, generator=gen).to(dev)).clamp(-1, 1)
        pred = E(x)
        w_loss = ((pred - w) / sigma).pow(2).mean()
        loss = w_loss
        if cfg.pixel_weight > 0:
            loss = loss + cfg.pixel_weight * (G.render(pred) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= cfg.steps - tail:
            tail_losses.append(w_loss.detach())
    bar.close()
    E.eval().requires_grad_(False)
    per_sample = 2 if cfg.pixel_weight > 0 else 1
    E.stats = EncoderStats(
        steps=cfg.steps,
        batch=cfg.batch,
        generator_evals=cfg.steps * cfg.batch * per_sample,
        seconds=round(time.perf_counter() - t0, 2),
        final_w_loss=float(torch.stack(tail_losses).mean()),
    )
    return E


@torch.no_grad()
def encode(E: Encoder, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """W vectors ``[N, w_dim]`` (on CPU) of images ``[N, C, size, size]`` (any device), in batches."""
    dev = next(E.parameters()).device
    E.eval()
    out = [E(x[i : i + batch].to(dev)).cpu() for i in range(0, x.shape[0], batch)]
    return torch.cat(out) if out else torch.zeros(0, E.w_dim)


@dataclass
class AdaptStats:
    """What the site-side adaptation of E cost and reached (site report keys)."""

    epochs: int
    steps: int
    generator_evals: int  # one G forward+backward per image per epoch
    seconds: float
    first_epoch_loss: float | None  # mean inversion loss per image over the first / last epoch
    last_epoch_loss: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"adapt_epochs": self.epochs, "adapt_steps": self.steps, "adapt_generator_evals": self.generator_evals,
                "adapt_seconds": round(self.seconds, 2), "adapt_first_epoch_loss": self.first_epoch_loss,
                "adapt_last_epoch_loss": self.last_epoch_loss}


def adapt_encoder(
    E: Encoder,
    G: Renderer,
    images: torch.Tensor,
    cfg: InversionConfig,
    feature_net: FeatureNet | None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Encoder, AdaptStats]:
    """Fine-tune a COPY of E on real images with the inversion loss (amortised inversion).

    ``cfg.encoder.adapt_epochs`` epochs over ``images`` in seeded random batches of
    ``cfg.encoder.adapt_batch``, Adam at ``adapt_lr`` with cosine decay; the loss per image is
    inversion's own (``pixel_weight`` x pixel MSE + ``feature_weight`` x (1 - cos) of the feature
    net's features). E, trained on generator samples, has only seen images on G's manifold; real
    images lie off it, and this closes part of that gap before refinement. E, G and the feature
    net are not changed; the copy has seen the images, so keep it where they are. With no step
    to take (0 epochs or no image) E itself is returned.
    """
    ec = cfg.encoder
    n = images.shape[0]
    bs = ec.adapt_batch
    total = ec.adapt_epochs * ((n + bs - 1) // bs)
    if total == 0:  # nothing to adapt: E itself
        return E, AdaptStats(ec.adapt_epochs, 0, 0, 0.0, None, None)
    t0 = time.perf_counter()
    dev = next(E.parameters()).device
    state = E.state_dict()
    A = Encoder(E.channels, E.size, E.w_dim, E.width, state["w_avg"].cpu(), float(state["sigma_w"])).to(dev)
    A.load_state_dict(state)
    A.stats = E.stats
    use_f = feature_net is not None and cfg.feature_weight > 0
    if feature_net is not None:
        feature_net.eval()
    f_all = None
    if use_f and feature_net is not None:
        with torch.no_grad():
            f_all = torch.cat([F.normalize(feature_net.features(images[i : i + 512].to(dev)), dim=1)
                               for i in range(0, n, 512)])
    opt = torch.optim.Adam(A.parameters(), lr=ec.adapt_lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    gen = torch.Generator().manual_seed(seed + 3)
    epoch_loss: list[float] = []
    A.train().requires_grad_(True)
    bar = P.bar(total=total, desc="encoder adapt", unit="steps", show=progress)
    for _ in range(ec.adapt_epochs):
        perm = torch.randperm(n, generator=gen)
        acc = torch.zeros((), device=dev)
        for i in range(0, n, bs):
            j = perm[i : i + bs]
            x = images[j].to(dev)
            mse, fl = reconstruction_losses(G, A(x), x, feature_net if use_f else None,
                                            f_all[j.to(dev)] if f_all is not None else None)
            per = inversion_loss(cfg, mse, fl)
            opt.zero_grad(set_to_none=True)
            per.mean().backward()
            opt.step()
            sched.step()
            acc += per.detach().sum()
            bar.update(1)
        epoch_loss.append(float(acc) / n)
    bar.close()
    A.eval().requires_grad_(False)
    return A, AdaptStats(ec.adapt_epochs, total, ec.adapt_epochs * n, time.perf_counter() - t0,
                         epoch_loss[0], epoch_loss[-1])


def w_error(w: torch.Tensor, w_true: torch.Tensor, sigma_w: float) -> torch.Tensor:
    """Per-sample mean squared W error in units of sigma_W^2."""
    return ((w - w_true) / sigma_w).pow(2).mean(1)


@dataclass(frozen=True)
class EncoderPayload:
    """E as data: its weights and what is needed to rebuild and trust it (file and message alike).

    The coordinator ships it with G in the synthesis task (plan_shared.protocol.SynthesisTask);
    :func:`save_encoder` writes the same content to a file. It holds no patient data.
    """

    state: dict[str, torch.Tensor]
    generator_sha256: str  # the G it was trained for (plan_shared.gan.generator_digest)
    arch: dict[str, int]  # channels, size, w_dim, width
    stats: EncoderStats | None = None

    ARCH_KEYS: ClassVar[tuple[str, ...]] = ("channels", "size", "w_dim", "width")

    def meta(self) -> dict[str, int | float | str]:
        """Flat scalars (a Flower ConfigRecord): format, generator digest, architecture, training figures."""
        out: dict[str, int | float | str] = {"format": FORMAT, "generator-sha256": self.generator_sha256}
        out.update({f"arch-{k}": int(self.arch[k]) for k in self.ARCH_KEYS})
        if self.stats is not None:
            out.update({f"stats-{k}": v for k, v in self.stats.as_dict().items()})
        return out

    @classmethod
    def from_meta(cls, state: dict[str, torch.Tensor], meta: Mapping[str, Any], where: str = "encoder") -> EncoderPayload:
        """The inverse of :meth:`meta`; ValueError naming ``where`` and the key at fault."""
        if meta.get("format") != FORMAT:
            raise ValueError(f"{where}: not an encoder (format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            arch = {k: int(meta[f"arch-{k}"]) for k in cls.ARCH_KEYS}
            sha = str(meta["generator-sha256"])
            st = {k[len("stats-"):]: v for k, v in meta.items() if k.startswith("stats-")}
            stats = EncoderStats.from_dict(st) if st else None
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: missing or invalid key {err}") from None
        return cls(dict(state), sha, arch, stats)


def encoder_payload(E: Encoder, generator_sha256: str) -> EncoderPayload:
    """E's weights (on CPU) and architecture, tied to the digest of the generator it was trained for."""
    return EncoderPayload({k: v.detach().cpu() for k, v in E.state_dict().items()}, generator_sha256,
                          {"channels": E.channels, "size": E.size, "w_dim": E.w_dim, "width": E.width}, E.stats)


def encoder_from_payload(p: EncoderPayload, generator_sha256: str, device: torch.device | str = "cpu",
                         where: str = "encoder") -> Encoder:
    """Rebuild E; refuses one trained for other generator weights or whose weights do not fit its architecture."""
    if p.generator_sha256 != generator_sha256:
        raise ValueError(f"{where}: encoder was trained for generator {p.generator_sha256[:12]}, "
                         f"not for this one ({generator_sha256[:12]})")
    st, a = p.state, p.arch
    if "w_avg" not in st or "sigma_w" not in st:
        raise ValueError(f"{where}: encoder weights lack w_avg / sigma_w")
    try:
        E = Encoder(a["channels"], a["size"], a["w_dim"], a["width"], st["w_avg"], float(st["sigma_w"]))
        E.load_state_dict(st)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{where}: encoder weights do not fit its architecture {a}: {err}") from None
    E.stats = p.stats
    return E.to(device).eval().requires_grad_(False)


def save_encoder(E: Encoder, path: str | Path, generator_sha256: str) -> Path:
    """Write E (weights, architecture, the digest of the generator it was trained for) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = encoder_payload(E, generator_sha256)
    obj = {"format": FORMAT, "meta": p.meta(), "state": p.state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_encoder(path: str | Path, generator_sha256: str, device: torch.device | str = "cpu") -> Encoder:
    """Read an encoder written by :func:`save_encoder`; refuses one trained for other generator weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable encoder file ({err})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("meta"), dict):
        raise ValueError(f"{path}: not an encoder file (format {obj.get('format') if isinstance(obj, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    return encoder_from_payload(EncoderPayload.from_meta(obj["state"], obj["meta"], str(path)), generator_sha256,
                                device, str(path))


def encoder_for(
    G: Renderer,
    cfg: EncoderConfig,
    generator_sha256: str,
    device: torch.device | str,
    progress: bool = True,
    seed: int = 0,
    sigma_w: float | None = None,
) -> tuple[Encoder, bool]:
    """The pipeline's entry: load ``cfg.path`` when it holds an encoder for this generator, else train
    (and write it there when ``cfg.path`` is set). Returns ``(E, loaded)``."""
    if cfg.path is not None and Path(cfg.path).is_file():
        try:
            return load_encoder(cfg.path, generator_sha256, device), True
        except ValueError as err:  # other generator weights (or an unreadable file): train and replace it
            LOG.warning("%s; training a new encoder", err)
    E = train_encoder(G, cfg, device, progress=progress, seed=seed, sigma_w=sigma_w)
    if cfg.path is not None:
        save_encoder(E, cfg.path, generator_sha256)
    return E, False


def encoder_init(
    G: Renderer,
    images: torch.Tensor,
    cfg: InversionConfig,
    generator_sha256: str,
    device: torch.device | str,
    progress: bool = True,
    seed: int = 0,
    sigma_w: float | None = None,
    shipped: EncoderPayload | None = None,
    feature_net: FeatureNet | None = None,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The inversion start of the site pipeline: ``(E(images), report)`` when ``cfg.encoder.enabled``,
    else ``(None, {"enabled": False})`` (inversion then starts from w_avg).

    E is ``shipped`` (the coordinator's, sent with G; its generator digest must be
    ``generator_sha256``, else ValueError), else loaded from ``cfg.encoder.path``, else trained here.
    The report: ``source`` (coordinator / file / site), the generator evaluations and seconds this
    site spent training E (0 unless ``source`` is site), E's own training cost wherever it ran
    (``e_train_*``), its final W loss, and the pixel MSE at E(x). With ``cfg.encoder.adapt_epochs``, a
    copy of E is first fine-tuned on ``images`` (:func:`adapt_encoder`, the inversion loss with
    ``feature_net``) and encodes them; its cost is in the ``adapt_*`` keys (one generator evaluation
    per image per epoch, spent at this site on top of the refinement's).
    """
    ec = cfg.encoder
    if not ec.enabled:
        return None, {"enabled": False, "shipped": shipped is not None}
    t0 = time.perf_counter()
    if shipped is not None:
        E = encoder_from_payload(shipped, generator_sha256, device, "the encoder shipped with the generator")
        source = "coordinator"
    else:
        E, loaded = encoder_for(G, ec, generator_sha256, device, progress=progress, seed=seed, sigma_w=sigma_w)
        source = "file" if loaded else "site"
    t_train = time.perf_counter() - t0
    E, ad = adapt_encoder(E, G, images, cfg, feature_net, seed=seed, progress=progress)
    w0 = encode(E, images)
    with torch.no_grad():
        dev = G.w_avg.device
        mse0 = torch.cat([(G.render(w0[i : i + 512].to(dev)) - images[i : i + 512].to(dev)).pow(2).flatten(1).mean(1).cpu()
                          for i in range(0, len(w0), 512)]) if len(w0) else torch.zeros(0)
    st = E.stats
    here = source == "site"
    evals = st.generator_evals if st is not None and here else 0
    return w0, ad.as_dict() | {
        "enabled": True, "source": source, "loaded": source == "file", "path": ec.path, "parameters": n_parameters(E),
        "train_steps": st.steps if st is not None else ec.steps, "train_batch": st.batch if st is not None else ec.batch,
        "train_seconds": round(t_train, 2) if here else 0.0,
        "train_generator_evals": evals,
        "train_generator_evals_per_image": evals / max(len(images), 1),
        "e_train_generator_evals": st.generator_evals if st is not None else None,
        "e_train_seconds": st.seconds if st is not None else None,
        "final_w_loss": st.final_w_loss if st is not None else None,
        "mean_mse_at_init": float(mse0.mean()) if len(mse0) else None,
        "refine_steps": ec.refine_steps,
        "seconds_encode": round(time.perf_counter() - t0 - t_train - ad.seconds, 2),
    }
