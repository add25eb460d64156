"""Federation overhead and scale, measured with the Flower simulation engine (Ray).

    python benchmarks/federation.py                      # 3 and 10 sites, then 100 tiny sites
    python benchmarks/federation.py --sites 3 10 --no-100 --out bench.json

For each run: wall time of every round (send, wait, FedAvg, checkpoint, sample grid) against
the sum over sites of their local GAN compute (``train-s``: the GAN steps only; ``handler-s``:
the whole ClientApp handler with data loading and local state I/O), and

    ideal round = sum of local GAN compute / slots      (slots = sites run at once:
                                                          min(sites, CPUs / CPUs per site))
    overhead %  = 100 * (round wall - ideal round) / round wall
    vs whole-site schedule % : the same against the longest-first schedule of whole sites
                               on the slots (3 equal sites on 2 cores need 2 site-times)

i.e. the share of a round not explained by local GAN steps spread over the available
cores (message passing, (de)serialisation, FedAvg, checkpoint and sample grid, data loading,
scheduling). ``overhead_vs_sum_pct`` = 100 * (wall - sum) / wall is reported as well; it is
negative whenever sites really run in parallel. The 100-site run uses a tiny model and
reports the time per round and the peak resident memory of the whole process tree (driver
and Ray workers, sampled from /proc every 0.25 s). Images are random (shape and counts are
what matter for timing); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY_MODEL = {
    "generator": {"z_dim": 8, "w_dim": 8, "mapping_layers": 1, "base_channels": 16, "min_channels": 8},
    "discriminator": {"base_channels": 8, "max_channels": 16, "mbstd_group": 2},
    "gan": {"batch_size": 8, "augment": [], "r1_every": 4},
}
SMALL_MODEL = {  # the defaults at 32 px, smaller widths: a few hundred ms per step on one core
    "generator": {"z_dim": 32, "w_dim": 32, "mapping_layers": 2, "base_channels": 64, "min_channels": 16},
    "discriminator": {"base_channels": 16, "max_channels": 64, "mbstd_group": 4},
    "gan": {"batch_size": 16, "augment": ["translation"]},
}


def _make_npz(path: Path, n_train: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = {}
    for split, n in (("train", n_train), ("val", max(8, n_train // 4)), ("test", max(8, n_train // 4))):
        arr[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arr[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(path, **arr)
    return path


class TreeMemory:
    """Peak summed RSS of this process and all its descendants, sampled from /proc."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def sample() -> int:
        from server.coordinate import descendants

        total = 0
        for pid in (os.getpid(), *descendants(os.getpid())):
            try:
                with open(f"/proc/{pid}/statm") as fh:
                    total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _makespan(jobs: list[float], slots: int) -> float:
    """Length of the longest-job-first schedule of whole sites on ``slots`` workers (a site
    cannot be split across cores, so 3 equal sites on 2 cores take 2 site-times, not 1.5)."""
    load = [0.0] * slots
    for j in sorted(jobs, reverse=True):
        load[load.index(min(load))] += j
    return max(load)


def run_one(sites: int, rounds: int, local_steps: int, model: dict, size: int, per_site: int, work: Path) -> dict:
    from plan_shared.config import config_from_dict
    from server.simulate import run_simulation

    out = work / f"sim-{sites}"
    npz = _make_npz(work / f"data-{sites}.npz", per_site * sites, size)
    raw = {"seed": 0, "device": "cpu", "threads": 1,
           "data": {"source": "medmnist", "name": None, "path": str(npz), "size": size, "channels": 1},
           "partition": {"sites": sites, "scheme": "iid", "min_per_site": 2},
           "federation": {"rounds": rounds, "local_steps": local_steps, "min_nodes": sites,
                          "sample_grid": 16, "wait_for_nodes_s": 600, "round_timeout_s": 3600},
           "site": {"state_dir": str(out)}}  # the virtual sites' sites/NAME
    raw.update(json.loads(json.dumps(model)))
    cfg = config_from_dict(raw)
    t0 = time.perf_counter()
    with TreeMemory() as mem:
        run_simulation(cfg, out, num_cpus=os.cpu_count())
    total = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for r in recs:
        train = sum(s["train-s"] for s in r["sites"])
        handler = sum(s["handler-s"] for s in r["sites"])
        slots = max(1, min(sites, os.cpu_count() or 1))
        ideal = train / slots
        sched = _makespan([s["train-s"] for s in r["sites"]], slots)
        rows.append({"round": r["round"], "wall_s": r["wall_s"], "sum_train_s": round(train, 3),
                     "sum_handler_s": round(handler, 3), "slots": slots,
                     "overhead_pct": round(100 * (r["wall_s"] - ideal) / r["wall_s"], 1),
                     "schedule_s": round(sched, 3),
                     "overhead_vs_schedule_pct": round(100 * (r["wall_s"] - sched) / r["wall_s"], 1),
                     "overhead_vs_sum_pct": round(100 * (r["wall_s"] - train) / r["wall_s"], 1),
                     "parallelism": round(handler / r["wall_s"], 2)})
    steady = rows[1:] or rows  # round 1 includes Ray actor start-up and first data load
    return {
        "sites": sites, "rounds": rounds, "local_steps": local_steps, "image_size": size,
        "train_images_per_site": per_site, "cpus": os.cpu_count(), "total_s": round(total, 1),
        "rounds_detail": rows,
        "mean_round_s_after_first": round(float(np.mean([r["wall_s"] for r in steady])), 2),
        "mean_overhead_pct_after_first": round(float(np.mean([r["overhead_pct"] for r in steady])), 1),
        "mean_overhead_vs_schedule_pct_after_first": round(float(np.mean([r["overhead_vs_schedule_pct"] for r in steady])), 1),
        "peak_rss_tree_mib": round(mem.peak / 2**20, 0),
        "peak_rss_driver_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, nargs="*", default=[3, 10])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--no-100", action="store_true", help="skip the 100 tiny sites run")
    ap.add_argument("--rounds-100", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory(prefix="plan-fedbench-") as tmp:
        work = Path(tmp)
        from plan_shared.flower_env import flower_env

        os.environ.update(flower_env(work / "flwr"))
        for n in args.sites:
            results.append(run_one(n, args.rounds, args.local_steps, SMALL_MODEL, 32, 64, work))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rounds_detail"}), flush=True)
        if not args.no_100:
            results.append(run_one(100, args.rounds_100, 2, TINY_MODEL, 8, 8, work))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rounds_detail"}), flush=True)
    print("\n| sites | local steps | round wall (s) | sum local GAN (s) | overhead % | vs whole-site schedule % "
          "| peak RSS tree (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        st = r["rounds_detail"][1:] or r["rounds_detail"]
        print(f"| {r['sites']} | {r['local_steps']} | {r['mean_round_s_after_first']} | "
              f"{np.mean([x['sum_train_s'] for x in st]):.2f} | {r['mean_overhead_pct_after_first']} | "
              f"{r['mean_overhead_vs_schedule_pct_after_first']} | "
              f"{r['peak_rss_tree_mib']:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
