"""``plan-client synthesize``: the site pipeline (client/pipeline.py) from the command line.

Without ``--generator`` a generator is first trained locally (``gan.steps`` steps with
:class:`plan_shared.gan.GanTrainer`) and saved as ``OUT/generator.pt``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from plan_shared.config import PlanConfig

LOG = logging.getLogger("plan.synthesize")


def train_local_generator(cfg: PlanConfig, dataset, path: Path, progress: bool = True) -> Path:
    from plan_shared.data import to_tensor
    from plan_shared.gan import GanTrainer
    from plan_shared.runtime import resolve_device

    trainer = GanTrainer(cfg, dataset.channels, dataset.size, resolve_device(cfg.device))
    trainer.train_steps(to_tensor(dataset.train.images).to(trainer.device), cfg.gan.steps, progress=progress, desc="local GAN")
    trainer.save_checkpoint(path)
    return path


def synthesize(cfg: PlanConfig, out: Path, generator: Path | None = None, method: str | None = None) -> dict[str, Any]:
    from client.pipeline import run_site_pipeline, write_report
    from plan_shared.data import load_dataset
    from plan_shared.runtime import set_threads

    set_threads(cfg.threads)
    ds = load_dataset(cfg.data, cfg.seed)
    LOG.info("data: %s", ds.summary())
    out.mkdir(parents=True, exist_ok=True)
    t_gan = None
    if generator is None:
        t0 = time.perf_counter()
        generator = train_local_generator(cfg, ds, out / "generator.pt")
        t_gan = round(time.perf_counter() - t0, 2)
    report = run_site_pipeline(cfg, ds, generator, out, method)
    if t_gan is not None:
        report["timing"]["local_gan"] = t_gan
        write_report(out, report)
    return report


def summary_line(report: dict[str, Any]) -> str:
    m = report["methods"]
    f = report["filter"]
    parts = [
        f"{report['n_accepted']}/{report['n_candidates']} {report['method']} images accepted",
        f"planted rejected {f['planted_rejected']}/{f['planted_total']}",
    ]
    for k in ("plan", "linear"):
        if k in m and m[k]["n"]:
            parts.append(f"{k}: mean DCR {m[k]['mean_dcr']:.3f}, mean max id-prob {m[k]['mean_max_id_prob']:.3f}")
    parts.append(f"total {report['timing']['total']:.0f}s")
    return "; ".join(parts)


def resolve_config(config: Path | None, dataset: str | None, data: Path | None, sets: list[str] | None, **extra) -> PlanConfig:
    """site.yaml (or defaults) + ``--dataset`` / ``--data`` + ``--set KEY=VALUE`` + explicit options."""
    from plan_shared.config import data_overrides, load_config, parse_sets

    over: dict[str, Any] = data_overrides(dataset, data)
    over.update(parse_sets(sets))
    over.update({k: v for k, v in extra.items() if v is not None})
    return load_config(config, over, role="site")
