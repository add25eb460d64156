"""``plan-server simulate``: the Flower app with N virtual hospitals on one machine.

The same ServerApp and ClientApp as in deployment run under Flower's simulation
engine (Ray); one data set is split into N sites (IID or Dirichlet label skew,
seeded), each virtual site keeps its state under ``OUT/sites/site-<k>``, and the
coordinator writes ``OUT/checkpoints``, ``OUT/samples`` and ``OUT/metrics.jsonl``.

The in-process engine (``flwr.simulation.run_simulation``) is used because it starts
in seconds and stops with the command; ``flwr run .`` with a local-simulation
connection runs the same app (see deploy/README.md).

What the terminal shows (:func:`console_logging`): by default only our lines and
errors. The virtual sites run in Ray actors whose output Ray would forward with its
own prefixes; instead each site writes its progress events (and its warnings/errors)
to ``OUT/sites/<site>/progress.jsonl`` (client/progress_rpc.py) and a thread here
prints them as ``[site-1] navigation 12/24 steps  41 s elapsed, ETA 38 s``.
``verbose=True`` brings back Flower's DEBUG log, Ray's forwarding and its warnings.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from plan_shared.config import PlanConfig, data_overrides, load_config
from plan_shared.runtime import setup_logging

LOG = logging.getLogger("plan.simulate")


def simulation_config(
    config: Optional[str] = None,
    *,
    sites: int = 3,
    rounds: Optional[int] = None,
    dataset: Optional[str] = None,
    data: Optional[str] = None,
    partition: Optional[str] = None,
    alpha: Optional[float] = None,
    out: str | Path = "sim-out",
    overrides: Optional[dict[str, Any]] = None,
) -> PlanConfig:
    ov: dict[str, Any] = dict(overrides or {})
    ov.update(data_overrides(dataset, Path(data).expanduser().resolve() if data else None))
    ov["partition.sites"] = sites
    if partition:
        ov["partition.scheme"] = partition
    if alpha is not None:
        ov["partition.alpha"] = alpha
    if rounds is not None:
        ov["federation.rounds"] = rounds
    ov["federation.state_dir"] = str(Path(out).expanduser().resolve())
    cfg = load_config(config, {k: v for k, v in ov.items() if v is not None})
    fed: dict[str, Any] = {}
    if cfg.federation.min_nodes > sites:
        fed["min_nodes"] = sites
    if "straggler_grace" not in cfg.federation.model_fields_set:
        # Virtual sites queue for the machine's cores, so the last ones always come late:
        # a straggler grace would drop them every round. Wait for all unless asked otherwise.
        fed["straggler_grace"] = None
    if fed:
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update=fed)})
    return cfg


def console_logging(verbose: bool = False) -> None:
    """Our loggers at INFO; others (alembic, httpx, ...) at WARNING; Flower's only for errors unless ``verbose``.

    Flower's logger has its own console handler and also propagates to the root one
    (every Flower line twice); it is made not to propagate. ``verbose``: DEBUG everywhere.
    """
    from flwr.common.logger import update_console_handler

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("plan").setLevel(logging.DEBUG if verbose else logging.INFO)
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    update_console_handler(level=logging.DEBUG if verbose else logging.ERROR)


@contextmanager
def _quiet_call(verbose: bool):
    """Silence, around our call of the engine only, the two warnings it raises by our choice.

    * Flower: ``run_simulation`` is deprecated (logged through Flower's logger, which is at
      ERROR unless verbose, see :func:`console_logging`); kept because ``flwr run`` needs a
      SuperLink process, its SuperExec and a separate simulation process (see the note in
      the module docstring of server/demo.py).
    * Ray: a FutureWarning that a future Ray will stop hiding GPUs from actors with
      ``num_gpus=0``; the virtual sites rely on today's behaviour (CPU actors).
    """
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)
        yield


def run_simulation(cfg: PlanConfig, out: str | Path, cpus_per_site: float = 1.0, num_cpus: Optional[int] = None,
                   verbose: bool = False) -> dict[str, Any]:
    """Run the federation in-process with ``cfg.partition.sites`` virtual SuperNodes.

    The sites' progress lines are printed (``plan.progress`` log) while it runs.
    """
    from plan_shared.progress import ProgressTail, TailPrinter, watchdog

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(out / ".flwr"))
    if cfg.threads is None:  # one torch thread per virtual site, or N sites oversubscribe the cores
        cfg = cfg.model_copy(update={"threads": max(1, int(cpus_per_site))})
    (out / "config.yaml").write_text(cfg.to_yaml())
    os.environ["PLAN_FED_RUN_CONFIG"] = json.dumps(
        {"plan-config": json.dumps(cfg.to_dict()), "out-dir": str(out), "expected-nodes": cfg.partition.sites}
    )
    from flwr.simulation import run_simulation as flwr_run_simulation

    from client.app import app as client_app  # noqa: F401 - imported by Ray actors by module path too
    from server.app import app as server_app

    ncpu = num_cpus or os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": ncpu, "include_dashboard": False, "ignore_reinit_error": True,
                      "log_to_driver": verbose, "logging_level": "DEBUG" if verbose else "ERROR"},
    }
    t0 = time.perf_counter()
    progress_log = logging.getLogger("plan.progress")
    tail = ProgressTail(out / "sites", "*/progress.jsonl", from_end=True)  # a reused OUT keeps older runs' lines
    try:
        with TailPrinter(tail, logger=progress_log), _quiet_call(verbose), \
                watchdog("coordinator", f"simulation of {cfg.partition.sites} sites", progress_log):
            flwr_run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.partition.sites,
                                backend_config=backend, verbose_logging=verbose)
    finally:
        os.environ.pop("PLAN_FED_RUN_CONFIG", None)
    wall = time.perf_counter() - t0
    fed_json = out / "federation.json"
    if not fed_json.is_file():
        raise RuntimeError(f"the simulation ended without finishing its rounds; see the log above and {out}/metrics.jsonl")
    summary = json.loads(fed_json.read_text())
    if summary.get("rounds_done") != cfg.federation.rounds:
        raise RuntimeError(f"simulation stopped after {summary.get('rounds_done')} of {cfg.federation.rounds} rounds")
    summary["wall_s"] = round(wall, 2)
    fed_json.write_text(json.dumps(summary, indent=1))
    return summary


def simulate_command(
    config: Optional[str], sites: int, rounds: Optional[int], dataset: Optional[str], data: Optional[str],
    partition: Optional[str], alpha: Optional[float], out: str, local_steps: Optional[int] = None,
    share: Optional[str] = None, verbose: bool = False,
) -> dict[str, Any]:
    console_logging(verbose)
    ov = {"federation.local_steps": local_steps, "federation.share": share}
    cfg = simulation_config(config, sites=sites, rounds=rounds, dataset=dataset, data=data, partition=partition,
                            alpha=alpha, out=out, overrides=ov)
    LOG.info("simulating %d sites x %d rounds (%s partition), output in %s", sites, cfg.federation.rounds,
             cfg.partition.scheme, out)
    return run_simulation(cfg, out, verbose=verbose)
