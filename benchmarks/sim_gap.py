"""The simulation's between-round gap: 3 virtual sites on the machine's cores, queued vs all at once.

Flower's Ray backend makes ``Ray CPUs // CPUs per site`` actors. ``queued`` tells Ray the
machine's cores (as the simulation did before server/simulate.py:actor_resources), so with
3 sites on 2 cores the third site trains after the other two and site-0 idles between its
GAN rounds; ``at-once`` is the default now (one actor per site, the sites share the cores).
Per mode, from ``metrics.jsonl`` and ``sites/*/progress.jsonl``: the median round wall and
site-0's median gap between the end of one GAN round and the start of the next.

    python benchmarks/sim_gap.py                      # 3 sites, 3 rounds x 20 local steps
    python benchmarks/sim_gap.py --modes at-once --rounds 2 --json gap.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = {  # a few hundred ms per GAN step on one core: the round is seconds of real work
    "generator": {"z_dim": 32, "w_dim": 32, "mapping_layers": 2, "base_channels": 64, "min_channels": 16},
    "discriminator": {"base_channels": 16, "max_channels": 64, "mbstd_group": 4},
    "gan": {"batch_size": 16, "augment": []},
}


def _npz(path: Path, n_train: int, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    arr = {}
    for split, n in (("train", n_train), ("val", 16), ("test", 16)):
        arr[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arr[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(path, **arr)  # type: ignore[arg-type]
    return path


def site_gaps(progress: Path) -> list[float]:
    """Seconds from the end of each ``GAN round r`` to the start of ``GAN round r+1`` in a progress.jsonl."""
    ev = [json.loads(x) for x in progress.read_text().splitlines() if x.strip()]
    start = {e["stage"]: e["t"] for e in ev if e["stage"].startswith("GAN round") and e["event"] == "start"}
    end = {e["stage"]: e["t"] for e in ev if e["stage"].startswith("GAN round") and e["event"] == "end"}
    rounds = sorted(int(s.split()[-1]) for s in start)
    return [round(start[f"GAN round {r + 1}"] - end[f"GAN round {r}"], 2)
            for r in rounds if f"GAN round {r}" in end and f"GAN round {r + 1}" in start]


def run_mode(mode: str, work: Path, sites: int, rounds: int, local_steps: int) -> dict[str, Any]:
    from plan_shared.config import config_from_dict
    from server import simulate

    ncpu = os.cpu_count() or 1
    raw: dict[str, Any] = {
        "seed": 0, "device": "cpu", "threads": 1,
        "data": {"source": "medmnist", "path": str(_npz(work / "data.npz", 64 * sites)), "size": 32, "channels": 1},
        "partition": {"scheme": "iid", "sites": sites},
        "federation": {"rounds": rounds, "local_steps": local_steps, "min_nodes": sites, "sample_grid": 4,
                       "state_dir": str(work / mode)},
        **MODEL,
    }
    cfg = config_from_dict(raw)
    queued = (lambda n, c, cores: (1, cores)) if mode == "queued" else simulate.actor_resources
    t0 = time.perf_counter()
    with mock.patch.object(simulate, "actor_resources", queued):
        simulate.run_simulation(cfg, work / mode, num_cpus=ncpu)
    wall = time.perf_counter() - t0
    out = work / mode
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    gaps = site_gaps(out / "sites" / "site-0" / "progress.jsonl")
    return {"round_wall_s": [r["wall_s"] for r in recs], "median_round_s": statistics.median(r["wall_s"] for r in recs),
            "site0_gaps_s": gaps, "median_gap_s": statistics.median(gaps) if gaps else None,
            "sum_train_s": [round(sum(s["train-s"] for s in r["sites"]), 2) for r in recs], "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="queued,at-once")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"sites": args.sites, "cores": os.cpu_count(), "load_before": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="plan-sim-gap-") as tmp:
        for m in [x.strip() for x in args.modes.split(",") if x.strip()]:
            if m not in ("queued", "at-once"):
                ap.error(f"--modes: unknown mode {m!r} (queued, at-once)")
            r = res["modes"][m] = run_mode(m, Path(tmp), args.sites, args.rounds, args.local_steps)
            print(f"[{m}] rounds {r['round_wall_s']} s (median {r['median_round_s']:.1f}), site-0 gaps "
                  f"{r['site0_gaps_s']} s, sum of site GAN seconds per round {r['sum_train_s']}", flush=True)
    res["load_after"] = os.getloadavg()
    print(f"load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
