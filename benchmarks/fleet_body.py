"""Largest Fleet API request body a SuperNode sends: how deploy/nginx-plan.conf's client_max_body_size is sized.

    python benchmarks/fleet_body.py

Builds the real G and D (``GanTrainer``) for the deploy config and for two larger ones,
wraps their weights in the ``ArrayRecord`` a site sends each round (share gd: G and D),
and lets Flower 1.42 split it into the objects it pushes, one per request (``PushObject``).
Prints the weights' size and the largest object, the largest request body.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import ArrayRecord  # noqa: E402
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

from plan_shared.config import load_config  # noqa: E402
from plan_shared.gan import GanTrainer  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "coordinator.yaml"

CASES = [
    ("deploy/coordinator.yaml (32x32x1)", {}, 1),
    ("256x256x3, G base 512, D up to 512", {"data.size": 256, "generator.base_channels": 512,
                                            "discriminator.base_channels": 64, "discriminator.max_channels": 512}, 3),
    ("1024x1024x3 (largest data.size), G base 512, D up to 512",
     {"data.size": 1024, "generator.base_channels": 512, "discriminator.base_channels": 64,
      "discriminator.max_channels": 512}, 3),
]


def main() -> None:
    print(f"Flower array chunk limit: {FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE / 2**20:.2f} MiB")
    for name, over, channels in CASES:
        cfg = load_config(DEPLOY, {"device": "cpu", **over})
        weights = GanTrainer(cfg, channels, cfg.data.size, "cpu").weights("gd")
        n = sum(a.numel() * a.element_size() for a in weights.values())
        objs = get_all_nested_objects(ArrayRecord(weights))
        largest = max(len(o.deflate()) for o in objs.values())
        print(f"{name}: G+D weights {n / 2**20:.1f} MiB -> {len(objs)} objects, largest {largest / 2**20:.2f} MiB ({largest} bytes)")


if __name__ == "__main__":
    main()
