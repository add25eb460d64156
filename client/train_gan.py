"""``plan-client train-gan``: train the generator at one site, alone.

Writes into ``OUT``: ``checkpoint.pt`` (latest, atomic), ``samples/step-NNNNNN.png``
every ``gan.sample_every`` steps and ``samples/final.png``, ``config.yaml`` (the
resolved configuration), ``train_log.jsonl`` (one line per logged interval) and
``report.json`` (steps, time, parameter counts, final losses). With ``--resume`` an
existing ``checkpoint.pt`` in ``OUT`` is continued exactly.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from plan_shared.config import PlanConfig

LOG = logging.getLogger("plan.train_gan")


def train_gan(cfg: PlanConfig, out: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.gan.steps`` steps (in total, counting a resumed checkpoint) and write ``out``."""
    import torch

    from plan_shared.data import load_dataset, to_tensor
    from plan_shared.gan import GanTrainer
    from plan_shared.runtime import resolve_device, seed_everything, set_threads

    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data, cfg.seed)
    LOG.info("data: %s", ds.summary())
    images = to_tensor(ds.train.images).to(device)
    t_data = time.perf_counter() - t0

    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        trainer = GanTrainer.from_checkpoint(ckpt, device)
        if (trainer.channels, trainer.size) != (ds.channels, ds.size):
            raise ValueError(
                f"{ckpt}: checkpoint is {trainer.channels}x{trainer.size}px but the data are {ds.channels}x{ds.size}px"
            )
        trainer.cfg.gan.steps = cfg.gan.steps
        LOG.info("resumed %s at step %d", ckpt, trainer.step)
    else:
        trainer = GanTrainer(cfg, ds.channels, ds.size, device)
    (out / "config.yaml").write_text(trainer.cfg.to_yaml())

    n_g = sum(p.numel() for p in trainer.G.parameters())
    n_d = sum(p.numel() for p in trainer.D.parameters())
    LOG.info("G: %d parameters, D: %d parameters, device %s", n_g, n_d, device)
    remaining = max(cfg.gan.steps - trainer.step, 0)
    log_path = out / "train_log.jsonl"
    window: dict[str, float] = {}
    t_train = time.perf_counter()

    def on_step(tr: GanTrainer, m: dict[str, float]) -> None:
        for k, v in m.items():
            window[k] = window.get(k, 0.0) + v
        window["_n"] = window.get("_n", 0.0) + 1
        if tr.step % cfg.gan.sample_every == 0 or tr.step == cfg.gan.steps:
            n = window.pop("_n")
            line = {k: round(v / n, 5) for k, v in window.items()}
            line.update(step=tr.step, images_seen=tr.images_seen, elapsed_s=round(time.perf_counter() - t_train, 1))
            with log_path.open("a") as fh:
                fh.write(json.dumps(line) + "\n")
            window.clear()
            tr.sample_grid(out / "samples" / f"step-{tr.step:06d}.png")
        if tr.step % cfg.gan.checkpoint_every == 0:
            tr.save_checkpoint(ckpt)

    metrics = trainer.train_steps(images, remaining, progress=progress, callback=on_step, desc="train-gan") if remaining else {}
    train_s = time.perf_counter() - t_train
    trainer.save_checkpoint(ckpt)
    final = trainer.sample_grid(out / "samples" / "final.png")
    report = {
        "dataset": ds.name,
        "n_train": len(ds.train),
        "size": ds.size,
        "channels": ds.channels,
        "steps": trainer.step,
        "steps_this_run": remaining,
        "images_seen": trainer.images_seen,
        "batch_size": cfg.gan.batch_size,
        "params": {"generator": n_g, "discriminator": n_d},
        "seed": cfg.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "timing": {"data_s": round(t_data, 2), "train_s": round(train_s, 2)},
        "steps_per_s": round(remaining / train_s, 3) if remaining and train_s > 0 else None,
        "final_losses": {k: round(v, 5) for k, v in metrics.items() if k.startswith(("loss", "r1", "d_"))},
        "checkpoint": str(ckpt),
        "sample_grid": str(final),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
