"""A site (hospital) as the ClientApp sees it: who it is, its data, its state folder.

Two ways to be told who we are, both through Flower's ``context.node_config``:

* deployment (``plan-client start`` writes the SuperNode's ``--node-config`` file)::

      site-id = "hospital-a"
      data-source = "medmnist"          # medmnist | imagefolder | csv
      data-path = "/data/pneumonia.npz"
      state-dir = "/var/lib/plan/site"
      pool-address = "coordinator.example.org:9444"   # optional: where this site exports
      pool-server-name = "coordinator.example.org"     # optional
      pool-credentials = "/etc/plan/site"               # client.crt, client.key, signing.key, ca.crt
      min-k = "5"                       # optional site_minimums (site.yaml): the loosest synthesis
      max-tau-id = "0.5"                #   request this site accepts (client/post_training.py)

  The coordinator's configuration decides the models and the image shape; the site
  decides where its own images are and where and with which credentials it exports
  (``site.cfg.site.pool_address``/``pool_keys_dir`` and ``site.cfg.pool.server_name`` come from the
  node config only, never from the coordinator), and
  the minimums its privacy filter must meet (``site.cfg.site_minimums``, likewise).
* simulation: Flower sets ``partition-id`` and ``num-partitions``; the site's data is
  that partition of the coordinator's data set (seeded, so every virtual site agrees
  on the split) and its state lives under ``<site.state_dir>/sites/site-<id>``.

Nothing here leaves the site except what the train handler returns (weights, metrics).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from plan_shared.config import PlanConfig, SiteMinimumsConfig

LOG = logging.getLogger("plan.site")

#: site_minimums key -> node-config key (written by client/supernode.py).
MINIMUM_KEYS = {
    "min_k": "min-k",
    "max_tau_id": "max-tau-id",
    "max_tau_indep": "max-tau-indep",
    "min_delta_quantile": "min-delta-quantile",
    "min_planted": "min-planted",
    "block_on_planted": "block-on-planted",
}


def minimums_from_node_config(nc: Mapping[str, Any]) -> SiteMinimumsConfig:
    """The site's own minimums from its node config (strings there); a bad value names the key."""
    raw = {}
    for key, nc_key in MINIMUM_KEYS.items():
        if nc.get(nc_key) not in (None, ""):
            v = nc[nc_key]
            raw[key] = {"true": True, "false": False}.get(str(v).lower(), v) if key == "block_on_planted" else v
    try:
        return SiteMinimumsConfig.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        raise ValueError(f"node config: key '{MINIMUM_KEYS[str(e['loc'][0])]}' = {e.get('input')!r}: {e['msg']}") from None

# Simulation: Ray actors live across rounds, so a partitioned data set is loaded once
# per actor process, not once per round.
_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Site:
    site_id: str
    state_dir: Path
    cfg: PlanConfig  # the coordinator's config with this site's data source applied
    partition_id: int | None = None
    num_partitions: int | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: PlanConfig) -> Site:
        nc = dict(node_config or {})
        if "data-path" in nc or "site-id" in nc:
            site_id = str(nc.get("site-id") or cfg.site_id)
            data = cfg.data.model_copy()
            if nc.get("data-source"):
                data.source = str(nc["data-source"])  # type: ignore[assignment]  # validate_assignment checks the literal
            if nc.get("data-path"):
                data.path = str(nc["data-path"])
            if nc.get("data-name"):
                data.name = str(nc["data-name"])
            pool = cfg.pool.model_copy(update={
                "server_name": str(nc["pool-server-name"]) if nc.get("pool-server-name") else None,
            })
            own = cfg.site.model_copy(update={
                "pool_address": str(nc["pool-address"]) if nc.get("pool-address") else None,
                "pool_keys_dir": str(nc["pool-credentials"]) if nc.get("pool-credentials") else None,
            })
            site_cfg = cfg.model_copy(update={"data": data, "site_id": site_id, "pool": pool, "site": own,
                                              "site_minimums": minimums_from_node_config(nc)})
            state = Path(str(nc.get("state-dir") or Path(cfg.site.state_dir) / "sites" / site_id))
            return cls(site_id, state.expanduser().resolve(), site_cfg)
        if "partition-id" in nc:
            pid, npart = int(nc["partition-id"]), int(nc["num-partitions"])
            site_id = f"site-{pid}"
            state = Path(cfg.site.state_dir) / "sites" / site_id
            site_cfg = cfg.model_copy(update={"site_id": site_id})
            return cls(site_id, state.resolve(), site_cfg, pid, npart)
        raise ValueError(
            "node config names no data: set site-id/data-path (plan-client start does this) "
            "or run under Flower simulation (partition-id)"
        )

    def dataset(self):
        """This site's ImageDataset (train/val/test splits of its own images)."""
        from plan_shared.data import load_dataset

        cfg = self.cfg
        if self.partition_id is None:
            key = ("site", cfg.data.model_dump_json(), cfg.seed)
            with _CACHE_LOCK:
                if key not in _CACHE:
                    _CACHE.clear()
                    _CACHE[key] = load_dataset(cfg.data, cfg.seed)
                return _CACHE[key]
        from plan_shared.partition import partition_dataset

        part = cfg.partition.model_copy(update={"sites": self.num_partitions})
        key = ("sim", cfg.data.model_dump_json(), part.model_dump_json(), cfg.seed)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE.clear()
                full = load_dataset(cfg.data, cfg.seed)
                _CACHE[key] = partition_dataset(full, part, cfg.seed)
            return _CACHE[key][self.partition_id]

    @property
    def trainer_state_path(self) -> Path:
        """The site's own trainer state between rounds (its D in share=g, optimiser moments, RNG)."""
        return self.state_dir / "local_trainer.pt"
