"""Local GAN training: the reusable step a site runs alone or per federated round.

Losses (StyleGAN2 family): non-saturating logistic loss for G and D, lazy R1 on
(augmented) real images, DiffAugment on everything D sees, an EMA copy ``G_ema``
of the generator whose half-life is counted in images. Every random draw comes
from the trainer's own ``torch.Generator`` or from torch's global RNG, and both
states are in the checkpoint, so a resumed run takes the identical next step.

    trainer = GanTrainer(cfg, channels=1, size=32, device=torch.device("cpu"))
    metrics = trainer.train_steps(images, n_steps=100)
    trainer.save_checkpoint("gan.pt")
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from plan_shared import progress as P
from plan_shared.augment import diff_augment
from plan_shared.config import PlanConfig, config_from_stored
from plan_shared.files import atomic_write, file_sha256  # noqa: F401  (file_sha256: used via plan_shared.gan)
from plan_shared.imaging import save_grid
from plan_shared.models import build_discriminator, build_generator
from plan_shared.models.generator import StyleGenerator
from plan_shared.models.layers import set_channels_last, set_fused

_Nets = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], Callable[..., torch.Tensor]]  # mapping, synthesis, D
LOG = logging.getLogger("plan.gan")
CHECKPOINT_FORMAT = 1
Share = Literal["gd", "g"]


def _contiguous(obj: Any) -> Any:
    """``obj`` (nested dicts/lists of tensors) with every tensor in the ordinary contiguous layout."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def generator_digest(state: Any) -> str:
    """sha256 of a generator's weights alone: the same at every site and at the coordinator.

    ``state`` is a module or a state dict; a ``g_ema.`` prefix (the Flower record's keys) is
    dropped. Hashed: for each entry in name order, the name, dtype, shape and raw bytes, so
    neither the checkpoint file format nor the config embedded in it changes the digest.
    """
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256(b"plan-generator-weights/1\n")
    items = {(k[len("g_ema."):] if k.startswith("g_ema.") else k): v for k, v in state.items()}
    for name in sorted(items):
        t = items[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).replace('torch.', '')}\0{list(t.shape)}\0{t.numel() * t.element_size()}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class GanTrainer:
    """Owns G, G_ema, D, their optimisers and every RNG of a GAN training run."""

    def __init__(self, cfg: PlanConfig, channels: int, size: int, device: torch.device | str = "cpu"):
        self.cfg, self.channels, self.size = cfg, channels, size
        self.device = torch.device(device)
        torch.manual_seed(cfg.seed)  # identical initial weights for identical seeds
        self.G = build_generator(cfg, size, channels).to(self.device)
        self.D = build_discriminator(cfg, size, channels).to(self.device)
        set_fused(self.G, cfg.gan.fast)  # the same function with fewer passes
        set_fused(self.D, cfg.gan.fast)
        # G_ema renders with the reference ops, exactly as load_generator's copy will.
        self.G_ema: StyleGenerator = set_fused(copy.deepcopy(self.G), False).eval().requires_grad_(False)  # type: ignore[assignment]  # a copy of G
        if cfg.gan.fast:
            # channels_last: oneDNN convolutions, avg-pooling and bilinear upsampling all run faster on
            # NHWC activations (measured in benchmarks/gan_step.py --profile); the values are the same,
            # and weights(), state_dict() and checkpoints hand out ordinary contiguous tensors.
            set_channels_last(self.G)
            set_channels_last(self.D)
        g = cfg.gan
        # Lazy R1: D's Adam parameters are corrected for the regularisation interval.
        c = g.r1_every / (g.r1_every + 1)
        # fast: the multi-tensor Adam (same update, a few kernels instead of a loop over parameters).
        self._foreach = True if g.fast else None
        self.opt_g = torch.optim.Adam(
            self.G.parameters(), lr=g.lr_g, betas=(g.beta1, g.beta2), eps=1e-8, foreach=self._foreach
        )
        self.opt_d = torch.optim.Adam(
            self.D.parameters(), lr=g.lr_d * c, betas=(g.beta1**c, g.beta2**c), eps=1e-8, foreach=self._foreach
        )
        self._compiled: _Nets | None = None
        self.rng = torch.Generator().manual_seed(cfg.seed + 1)
        # G's noise inputs draw from torch's global RNG; the trainer keeps its own copy of
        # that state and swaps it in while training, so other code cannot perturb a run.
        self._torch_rng = torch.get_rng_state()
        self._cuda_rng = self._get_cuda_rng()
        self.step = 0
        self.images_seen = 0

    # ------------------------------------------------------------------ training
    def _get_cuda_rng(self) -> torch.Tensor | None:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.G.z_dim, generator=self.rng).to(self.device)

    def _real_batch(self, images: torch.Tensor, n: int) -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (n,), generator=self.rng)
        return images[idx].to(self.device, non_blocking=True)

    def _nets(self, compiled: bool) -> _Nets:
        """(mapping, synthesis, D) as called by the steps: the modules, or their compiled twins."""
        if not compiled:
            return self.G.mapping, self.G.synthesis, self.D
        if self._compiled is None:
            import torch._dynamo
            import torch._inductor.config

            # G's noise keeps eager's draws from torch's RNG (exact resume, same results as eager),
            # and a backend that cannot compile falls back to eager instead of failing the run.
            torch._inductor.config.fallback_random = True
            torch._dynamo.config.suppress_errors = True
            self._compiled = (
                torch.compile(self.G.mapping, dynamic=False),
                torch.compile(self.G.synthesis, dynamic=False),
                torch.compile(self.D, dynamic=False),
            )
        return self._compiled

    def use_compile(self, n_steps: int) -> bool:
        """Whether a training call of ``n_steps`` steps runs compiled G/D (config ``gan.compile``)."""
        g = self.cfg.gan
        if g.compile == "auto":
            return self.device.type == "cuda" and n_steps >= g.compile_min_steps
        return g.compile == "on"

    def _generate(self, n: int, nets: _Nets | None = None) -> torch.Tensor:
        mapping, synthesis, _ = nets or self._nets(False)
        z = self._sample_z(n)
        if self.cfg.gan.style_mixing > 0 and float(torch.rand((), generator=self.rng)) < self.cfg.gan.style_mixing:
            w = mapping(z, update_w_avg=True)
            w2 = mapping(self._sample_z(n))
            ws = w.unsqueeze(1).repeat(1, self.G.synthesis.num_ws, 1)
            cut = int(torch.randint(1, self.G.synthesis.num_ws, (), generator=self.rng))
            ws[:, cut:] = w2.unsqueeze(1)
            mixed: torch.Tensor = synthesis(ws)
            return mixed
        img: torch.Tensor = synthesis(mapping(z, update_w_avg=True))
        return img

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.cfg.gan.augment, self.rng) if self.cfg.gan.augment else x

    def _d_step(self, images: torch.Tensor, bs: int, nets: _Nets) -> torch.Tensor:
        """One D step; returns ``[loss_d, r1, d_real, d_fake, r1 computed]`` on the device (no host sync)."""
        g = self.cfg.gan
        self.D.requires_grad_(True)
        self.G.requires_grad_(False)
        real = self._real_batch(images, bs)
        with torch.no_grad():
            fake = self._generate(bs, nets)
        do_r1 = g.r1_gamma > 0 and self.step % g.r1_every == 0
        real_aug = self._augment(real).detach().requires_grad_(do_r1)
        if g.fast and not do_r1:
            # D does not draw random numbers, so augmenting the fakes first keeps every draw in place;
            # one pass over both halves, each with its own minibatch statistics.
            fake_aug = self._augment(fake)
            logits = nets[2](torch.cat([real_aug, fake_aug]), chunks=2)
            d_real, d_fake = logits[:bs], logits[bs:]
        else:
            # R1 needs the double backward, which compiled graphs do not support: eager D.
            d_real = self.D(real_aug)
            d_fake = self.D(self._augment(fake))
        loss_adv = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
        loss = loss_adv
        r1 = torch.zeros((), device=self.device)
        if do_r1:
            (grad,) = torch.autograd.grad(d_real.sum(), real_aug, create_graph=True)
            r1 = grad.square().sum(dim=[1, 2, 3]).mean()
            loss = loss + r1 * (g.r1_gamma / 2) * g.r1_every
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return torch.stack(
            [loss_adv.detach(), r1.detach(), d_real.detach().mean(), d_fake.detach().mean(),
             torch.tensor(float(do_r1), device=self.device)]
        )

    def _g_step(self, bs: int, nets: _Nets) -> torch.Tensor:
        self.D.requires_grad_(False)
        self.G.requires_grad_(True)
        loss = F.softplus(-nets[2](self._augment(self._generate(bs, nets)))).mean()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self, bs: int) -> None:
        g = self.cfg.gan
        half_life = g.ema_kimg * 1000
        if g.ema_rampup > 0:
            half_life = min(half_life, self.images_seen * g.ema_rampup)
        beta = 0.5 ** (bs / max(half_life, 1e-8))
        if self.cfg.gan.fast:
            ema: list[torch.Tensor] = list(self.G_ema.parameters())
            cur = [p.detach() for p in self.G.parameters()]
            torch._foreach_copy_(ema, torch._foreach_lerp(cur, ema, beta))
            torch._foreach_copy_(list(self.G_ema.buffers()), list(self.G.buffers()))
            return
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    def train_steps(
        self,
        images: torch.Tensor,
        n_steps: int,
        progress: bool = False,
        callback: Callable[[GanTrainer, dict[str, float]], None] | None = None,
        desc: str = "GAN",
    ) -> dict[str, float]:
        """Run ``n_steps`` D+G steps on ``images`` (float ``[N, C, H, W]`` in [-1, 1]).

        Returns the mean of each loss over the steps (``r1``: over the steps that computed it,
        every ``gan.r1_every``-th) plus ``steps`` and ``images_seen`` (cumulative). Losses stay on
        the device and are read once at the end; ``callback(trainer, last_metrics)`` runs after
        every step and gets that step's numbers as floats (one host sync per step).
        """
        if images.ndim != 4 or images.shape[1:] != (self.channels, self.size, self.size):
            raise ValueError(
                f"training images must be [N, {self.channels}, {self.size}, {self.size}], got {tuple(images.shape)}"
            )
        if images.shape[0] < 2:
            raise ValueError(f"need at least 2 training images, got {images.shape[0]}")
        bs = min(self.cfg.gan.batch_size, images.shape[0])
        if self.cfg.gan.fast:
            images = images.to(self.device)  # once, not per batch
        nets = self._nets(self.use_compile(n_steps))
        self.G.train()
        self.D.train()
        sums = torch.zeros(6, dtype=torch.float64, device=self.device)
        bar = P.bar(range(n_steps), desc=desc, unit="steps", show=progress)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.set_rng_state(self._torch_rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            try:
                self._loop(images, bs, nets, bar, progress, callback, sums)
            finally:
                self._torch_rng = torch.get_rng_state()
                self._cuda_rng = self._get_cuda_rng()
        tot = sums.tolist()
        n = max(n_steps, 1)
        out = {"loss_d": tot[0] / n, "r1": tot[1] / max(tot[4], 1.0), "d_real": tot[2] / n, "d_fake": tot[3] / n,
               "loss_g": tot[5] / n}
        out.update(steps=float(n_steps), images_seen=float(self.images_seen))
        return out

    def _loop(
        self,
        images: torch.Tensor,
        bs: int,
        nets: _Nets,
        bar: Any,
        progress: bool,
        callback: Callable[[GanTrainer, dict[str, float]], None] | None,
        sums: torch.Tensor,
    ) -> None:
        sync_each = not self.cfg.gan.fast or progress or callback is not None
        for _ in bar:
            step = torch.cat([self._d_step(images, bs, nets), self._g_step(bs, nets).reshape(1)])
            self.images_seen += bs
            self._update_ema(bs)
            self.step += 1
            sums += step
            if sync_each:
                v = step.tolist()
                m = {"loss_d": v[0], "r1": v[1], "d_real": v[2], "d_fake": v[3], "loss_g": v[5]}
                if progress:
                    bar.set_postfix(loss_g=f"{m['loss_g']:.3f}", loss_d=f"{m['loss_d']:.3f}", refresh=False)
                if callback is not None:
                    callback(self, m)

    # ------------------------------------------------------------------ weights
    def weights(self, share: Share = "gd") -> dict[str, torch.Tensor]:
        """Flat state with prefixed keys (``g.*``, ``g_ema.*`` and, for ``gd``, ``d.*``)."""
        out = {f"g.{k}": v.detach().cpu().contiguous() for k, v in self.G.state_dict().items()}
        out.update({f"g_ema.{k}": v.detach().cpu() for k, v in self.G_ema.state_dict().items()})
        if share == "gd":
            out.update({f"d.{k}": v.detach().cpu().contiguous() for k, v in self.D.state_dict().items()})
        return out

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load whichever of the ``g.``/``g_ema.``/``d.`` prefixes are present (strict per network)."""
        for prefix, net in (("g.", self.G), ("g_ema.", self.G_ema), ("d.", self.D)):
            part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            if part:
                net.load_state_dict(part, strict=True)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "generator": _contiguous(self.G.state_dict()),
            "generator_ema": self.G_ema.state_dict(),
            "discriminator": _contiguous(self.D.state_dict()),
            "opt_g": _contiguous(self.opt_g.state_dict()),
            "opt_d": _contiguous(self.opt_d.state_dict()),
            "step": self.step,
            "images_seen": self.images_seen,
            "config": self.cfg.to_dict(),
            "seed": self.cfg.seed,
            "arch": {"channels": self.channels, "size": self.size},
            "rng": self.rng.get_state(),
            "torch_rng": self._torch_rng,
            "cuda_rng": self._cuda_rng,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported checkpoint format {sd.get('format')!r} (expected {CHECKPOINT_FORMAT})")
        self.G.load_state_dict(sd["generator"])
        self.G_ema.load_state_dict(sd["generator_ema"])
        self.D.load_state_dict(sd["discriminator"])
        self.opt_g.load_state_dict(sd["opt_g"])
        self.opt_d.load_state_dict(sd["opt_d"])
        for opt in (self.opt_g, self.opt_d):  # the implementation follows this run's gan.fast, not the file's
            for group in opt.param_groups:
                group["foreach"] = self._foreach
            for p, st in opt.state.items():  # Adam's moments in the parameters' memory format
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        st[k] = torch.empty_like(p).copy_(v)
        self.step, self.images_seen = int(sd["step"]), int(sd["images_seen"])
        self.rng.set_state(sd["rng"])
        self._torch_rng = sd["torch_rng"]
        if sd.get("cuda_rng") is not None and self.device.type == "cuda":
            self._cuda_rng = sd["cuda_rng"]

    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomic write (temp file + rename): a crash never leaves a half checkpoint."""
        path = Path(path)
        _atomic_torch_save(self.state_dict(), path)
        return path

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> GanTrainer:
        sd = _load_checkpoint(path)
        cfg = config_from_stored(sd["config"], f"{path}:config")
        trainer = cls(cfg, sd["arch"]["channels"], sd["arch"]["size"], device)
        trainer.load_state_dict(sd)
        return trainer

    # ------------------------------------------------------------------ samples
    @torch.no_grad()
    def sample_grid(self, path: str | Path, n: int = 64, seed: int = 0) -> Path:
        return write_sample_grid(self.G_ema, path, n, seed)


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(sd, dict) or "generator_ema" not in sd:
        raise ValueError(f"{path}: not a generator checkpoint (no 'generator_ema' entry)")
    return sd


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> StyleGenerator:
    """The EMA generator of a checkpoint, in eval mode (what every later stage uses)."""
    sd = _load_checkpoint(path)
    cfg = config_from_stored(sd["config"], f"{path}:config")
    G = build_generator(cfg, sd["arch"]["size"], sd["arch"]["channels"])
    G.load_state_dict(sd["generator_ema"])
    return G.to(device).eval().requires_grad_(False)


@torch.no_grad()
def write_sample_grid(G: StyleGenerator, path: str | Path, n: int = 64, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    w = G.sample_w(n, gen)
    return save_grid(G.render(w, noise_mode="const"), path)




# ------------------------------------------------------------------ the per-round FD watch-point
WATCH_FD_SEED = 20240611  # the feature net's weights: fixed for good, so FD values of different runs compare
WATCH_FD_WIDTHS = (32, 64, 128)


class RandomFeatureNet(torch.nn.Module):
    """A fixed, untrained feature space for the federated GAN's per-round FD watch-point.

    Three 3x3 convolutions (32, 64, 128 channels, stride 2, padding 1, LeakyReLU 0.2) whose
    weights are drawn once from a normal distribution (He scaling, no bias) by a
    ``torch.Generator`` seeded with ``seed``: every site, process and round embeds images
    identically, and nothing is trained or downloaded. Features: the global average of the
    last two layers' activations (64 + 128 = 192 values per image). Distances in this space
    follow low-level statistics (intensity, texture, coarse layout), not semantics: compare FD
    values only between sets embedded by this net with the same seed, i.e. round against round.
    """

    def __init__(self, channels: int, seed: int = WATCH_FD_SEED, widths: tuple[int, ...] = WATCH_FD_WIDTHS):
        super().__init__()
        if channels < 1 or len(widths) < 2:
            raise ValueError(f"RandomFeatureNet: need channels >= 1 and at least 2 layers, got {channels}, {widths}")
        gen = torch.Generator().manual_seed(seed)
        c_in = channels
        for i, c in enumerate(widths):
            self.register_buffer(f"w{i}", torch.randn(c, c_in, 3, 3, generator=gen) * (2.0 / (c_in * 9)) ** 0.5)
            c_in = c
        self.n_layers = len(widths)
        self.feature_dim = widths[-2] + widths[-1]
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` images in [-1, 1] -> ``[N, feature_dim]`` float32 features."""
        pooled = []
        h = x.float()
        for i in range(self.n_layers):
            h = F.leaky_relu(F.conv2d(h, getattr(self, f"w{i}"), stride=2, padding=1), 0.2)
            if i >= self.n_layers - 2:
                pooled.append(h.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def embed(self, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Features of many images (any device), ``batch`` at a time; on the CPU."""
        dev = next(self.buffers()).device
        parts = [self(x[i : i + batch].to(dev)).cpu() for i in range(0, len(x), batch)]
        return torch.cat(parts) if parts else torch.zeros(0, self.feature_dim)


def watch_real_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The site's fixed FD reference: ``n`` of its train images (all when it has fewer), picked by ``seed``.

    The same images every round as long as the site's train split is the same.
    """
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[: max(n, 0)]
    return images[idx.sort().values]


@torch.no_grad()
def watch_fd(G: StyleGenerator, real: torch.Tensor, n: int, seed: int, net: RandomFeatureNet | None = None,
             batch: int = 256) -> float:
    """FD of ``G``'s samples against ``real`` in :class:`RandomFeatureNet`'s fixed feature space.

    ``n`` samples rendered from z drawn with ``seed`` (the same z every round, so the curve compares
    like with like), constant noise; ``real``: a fixed set of real images (:func:`watch_real_subset`).
    Neither draws from torch's global RNG nor touches ``G``'s state. The Fréchet distance's bias
    grows as the sets shrink: compare values at the same ``n`` and ``len(real)`` only.
    """
    from plan_shared.metrics import frechet_distance

    if n < 2 or len(real) < 2:
        raise ValueError(f"watch_fd: need at least 2 samples and 2 real images, got {n} and {len(real)}")
    net = net or RandomFeatureNet(G.channels).to(G.w_avg.device)
    gen = torch.Generator().manual_seed(seed)
    fake = []
    was_training = G.training
    G.eval()
    try:
        for i in range(0, n, batch):
            fake.append(net(G.render(G.sample_w(min(batch, n - i), gen), noise_mode="const")).cpu())
    finally:
        G.train(was_training)
    return frechet_distance(torch.cat(fake), net.embed(real, batch))
