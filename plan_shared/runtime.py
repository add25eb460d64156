"""Process-wide runtime set-up: seeding every RNG, picking the device, logging."""

from __future__ import annotations

import logging
import os
import random
import zlib

import numpy as np
import torch

LOG = logging.getLogger("plan")


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and torch from one integer; return a NumPy Generator for callers.

    The partitioner and every sampler take the returned generator (or a seed derived
    from ``seed``), so one config value reproduces a whole run. The seed is logged.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    LOG.info("seed %d set for python, numpy, torch", seed)
    return np.random.default_rng(seed)


def site_seed(seed: int, site_id: str) -> int:
    """A seed of its own for ``site_id``, derived from the run's ``seed`` (stable across processes and runs).

    For streams that must differ between sites although every site reads the same config:
    the random GAN baseline drew the same samples at every site from the one shared G and
    seed, so a second site exporting it added only copies (the pool stored 0 new files).
    """
    return (seed * 0x9E3779B1 + zlib.crc32(site_id.encode())) % 2**62


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available (use --device cpu or auto)")
    return dev


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("plan").setLevel(level)
