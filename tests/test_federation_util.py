"""Shared helpers of the federation tests (no tests here): tiny data and tiny models."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

# Small enough that a GAN step takes milliseconds on one core.
TINY = {
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "data": {"source": "medmnist", "name": None, "size": 8, "channels": 1},
    "partition": {"sites": 3, "scheme": "iid", "min_per_site": 4},
    "generator": {"z_dim": 8, "w_dim": 8, "mapping_layers": 1, "base_channels": 16, "min_channels": 8},
    "discriminator": {"base_channels": 8, "max_channels": 16, "mbstd_group": 2},
    "gan": {"batch_size": 4, "augment": [], "r1_every": 2},
    "federation": {"rounds": 2, "local_steps": 2, "min_nodes": 2, "wait_for_nodes_s": 60, "round_timeout_s": 120,
                   "sample_grid": 4},
    # the coordinator trains the inversion encoder before every synthesis phase: a few steps here
    "inversion": {"encoder": {"steps": 5, "batch": 8, "width": 4, "adapt_epochs": 1}},  # + 1 epoch of site adaptation
}


def tiny_config(**federation) -> dict:
    import copy

    cfg = copy.deepcopy(TINY)
    cfg["federation"].update(federation)
    return cfg


def make_npz(path: Path, n_train: int = 24, size: int = 8, seed: int = 0, classes: int = 2) -> Path:
    """A MedMNIST-format .npz of random grey images (N, H, W) uint8 with integer labels."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", max(4, n_train // 4)), ("test", max(4, n_train // 4))):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(-1, 1).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return env
