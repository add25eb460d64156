"""``plan-server simulate``: the Flower app with N virtual hospitals on one machine.

The same ServerApp and ClientApp as in deployment run under Flower's simulation
engine (Ray); one data set is split into N sites (IID or Dirichlet label skew,
seeded), each virtual site keeps its state under ``OUT/sites/site-<k>``, and the
coordinator writes ``OUT/checkpoints``, ``OUT/samples`` and ``OUT/metrics.jsonl``.

It runs the way Flower 1.42 supports (the in-process ``flwr.simulation.run_simulation``
is deprecated): a simulation SuperLink of our own on a free loopback port
(:class:`SimulationLink`, ``--disable-runtime-dependency-installation``, state in
``OUT/.flwr``), ``flwr run <app> --federation-config ... --run-config ...``, the run
followed with ``flwr ls`` to its real end state, everything stopped afterwards.

What the terminal shows: by default only our lines and errors. The ServerApp's log
arrives through ``flwr log --stream`` (kept whole in ``OUT/run.log``; lines of our
loggers and errors are shown). The virtual sites run in Ray actors whose output
stays out of the terminal (``init-args-log-to-driver=false``); each site writes its
progress events (and its warnings/errors) to ``OUT/sites/<site>/progress.jsonl``
(client/progress_rpc.py) and a thread here prints them as
``[site-1] navigation 12/24 steps  41 s elapsed, ETA 38 s``; a heartbeat line comes
when nothing was shown for 15 s. ``verbose=True`` shows the whole Flower log and Ray's
actor output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from plan_shared.config import PlanConfig, data_overrides, load_config
from plan_shared.flower_env import flower_env
from plan_shared.runtime import setup_logging

LOG = logging.getLogger("plan.simulate")


def simulation_config(
    config: str | None = None,
    *,
    sites: int = 3,
    rounds: int | None = None,
    dataset: str | None = None,
    data: str | None = None,
    partition: str | None = None,
    alpha: float | None = None,
    out: str | Path = "sim-out",
    overrides: dict[str, Any] | None = None,
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
    # The simulation plays both roles: the coordinator's run and every virtual site's sites/NAME live in out.
    ov["coordinator.state_dir"] = ov["site.state_dir"] = str(Path(out).expanduser().resolve())
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
    if "central_real" not in cfg.downstream.model_fields_set:  # fedreal: the coordinator holds the data set here
        cfg = cfg.model_copy(update={"downstream": cfg.downstream.model_copy(update={"central_real": True})})
    return cfg


def console_logging(verbose: bool = False) -> None:
    """This process's console: our loggers at INFO, others (alembic, httpx, ...) at WARNING, Flower's
    only for errors; ``verbose``: DEBUG everywhere.

    Flower's logger has its own console handler and also propagates to the root one
    (every Flower line twice); it is made not to propagate.
    """
    from flwr.common.logger import update_console_handler

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("plan").setLevel(logging.DEBUG if verbose else logging.INFO)
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    update_console_handler(level=logging.DEBUG if verbose else logging.ERROR)


# Lines of the run's log shown in the terminal: ours, and the first line of any other error
# (tracebacks stay in OUT/run.log). A ClientApp's exception is not shown as Flower logs it
# (its backend's message, a Ray actor's repr, the traceback): the ServerApp reports it as
# that site's failure with its reason.
OURS = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) plan[.:]")
ERRORS = re.compile(r"^(\d\d:\d\d:\d\d )?(ERROR|CRITICAL)\b")
CLIENTAPP_ERROR = re.compile(r"ClientAppActor|ClientAppException|processing a message by RayBackend|"
                             r"Traceback \(most recent call last\)")


class SimulationLink:
    """A simulation SuperLink of our own on loopback, for one ``flwr run`` (Flower 1.42's supported way).

    ``flwr run`` with Flower's built-in ``local`` connection would start a SuperLink that
    runs ``uv sync`` (fails offline) and keeps running afterwards; this one is started
    with ``--disable-runtime-dependency-installation``, its state under ``OUT/.flwr``, and
    stopped (its whole process tree: SuperExec, simulation process, Ray) when the run ends.
    """

    def __init__(self, out: Path):
        from server.coordinate import _bin

        self.out = out
        self.home = out / ".flwr"
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            self.port = sk.getsockname()[1]
        self.bin = {n: _bin(n) for n in ("flwr", "flower-superlink")}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "superlink.log"

    def env(self) -> dict[str, str]:
        return flower_env(self.home, Path(self.bin["flwr"]).parent)

    def start(self, timeout: float = 120.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        (self.home / "sim.db").unlink(missing_ok=True)  # one run per SuperLink: no state to keep
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.bin["flower-superlink"], "--insecure", "--simulation", "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.home / "sim.db")],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.home, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as sk:
                if sk.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the simulation SuperLink exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulation SuperLink did not open 127.0.0.1:{self.port} in {timeout:.0f}s; "
                                   f"see {self.log_path}")
            time.sleep(0.2)

    def flwr(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        r = subprocess.run([self.bin["flwr"], *args, "--format", "json"], env=self.env(), capture_output=True,
                           text=True, timeout=timeout, cwd=self.home)
        try:
            return json.loads(r.stdout[r.stdout.index("{"):])
        except ValueError:
            return {"success": False, "error-message": (r.stdout + r.stderr).strip()[-2000:]}

    def stop(self) -> None:
        from server.coordinate import descendants, kill_tree

        if self.proc is None:
            return
        tree = descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        kill_tree(self.proc.pid, tree)  # the simulation process and Ray's workers run in their own sessions
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.proc = None


def _follow_log(proc: subprocess.Popen, log_file: Path, verbose: bool, shown) -> None:
    """Copy the run's log (``flwr log --stream``) to ``log_file``; show ours and errors (all if verbose)."""
    with open(log_file, "a") as fh:
        for line in proc.stdout:  # type: ignore[union-attr]
            fh.write(line)
            fh.flush()
            text = line.rstrip("\n")
            if verbose or OURS.match(text) or (ERRORS.match(text) and not CLIENTAPP_ERROR.search(text)):
                print(text, file=sys.stderr, flush=True)
                shown()


def actor_resources(sites: int, cpus_per_site: float, ncpu: int) -> tuple[float | int, int]:
    """(CPUs per virtual site, CPUs Ray is told it has) so that every site gets an actor at once.

    Flower's Ray backend makes ``Ray CPUs // CPUs per site`` actors; with fewer actors than
    sites the last sites of a round wait until an actor is free (3 sites on 2 cores: the third
    site trained after the other two, a ~22 s gap between site-0's GAN rounds in the demo,
    one core idle meanwhile). Ray's CPUs are logical: telling it ``sites x cpus_per_site``
    runs all sites at once and they share the cores (each with ``threads`` torch threads).
    """
    # deploytrace: all virtual sites at once instead of a queue behind too few actors
    cpus = int(cpus_per_site) if float(cpus_per_site).is_integer() else cpus_per_site
    return cpus, max(int(ncpu), math.ceil(sites * cpus_per_site))


def _run_status(link: SimulationLink, rid: str, last: str) -> str:
    """The run's status from `flwr ls` (``last`` when it gives none)."""
    try:
        runs = link.flwr("ls", "--run-id", rid, timeout=60).get("runs") or []
    except subprocess.TimeoutExpired:  # plainrecipe: a slow status poll (a loaded machine) is not a failed run
        LOG.warning("simulation %s: `flwr ls` gave no answer within 60 s; polling again", rid)
        runs = []
    return str(runs[0].get("status", "")) if runs else last


def run_simulation(cfg: PlanConfig, out: str | Path, cpus_per_site: float = 1.0, num_cpus: int | None = None,
                   verbose: bool = False, app_dir: Path | None = None) -> dict[str, Any]:
    """Run the federation with ``cfg.partition.sites`` virtual SuperNodes: ``flwr run`` on a SuperLink of our own.

    Shown while it runs: the ServerApp's own log lines and errors (the whole Flower log is
    kept in ``OUT/run.log``), the sites' progress lines (``OUT/sites/*/progress.jsonl``),
    and a heartbeat line when nothing was shown for 15 s.
    """
    from plan_shared.progress import ProgressTail, TailPrinter, watchdog
    from server.coordinate import FINISHED, clear_run_markers, default_app_dir, status_check_due

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads is None:  # one torch thread per virtual site, or N sites oversubscribe the cores
        cfg = cfg.model_copy(update={"threads": max(1, int(cpus_per_site))})
    cfg_path = out / "config.yaml"
    cfg_path.write_text(cfg.to_yaml())
    (out / "federation.json").unlink(missing_ok=True)
    clear_run_markers(out)
    n = cfg.partition.sites
    cpus, ray_cpus = actor_resources(n, cpus_per_site, num_cpus or os.cpu_count() or 1)
    fed_cfg = (f"num-supernodes={n} client-resources-num-cpus={cpus} client-resources-num-gpus=0 "
               f"init-args-num-cpus={ray_cpus} init-args-log-to-driver={'true' if verbose else 'false'}")
    run_cfg = f'plan-config="{cfg_path}" out-dir="{out}" expected-nodes={n} num-server-rounds=0'
    progress_log = logging.getLogger("plan.progress")
    tail = ProgressTail(out / "sites", "*/progress.jsonl", from_end=True)  # a reused OUT keeps older runs' lines
    link = SimulationLink(out)
    t0 = time.perf_counter()
    status, rid, stream = "", "", None
    try:
        with TailPrinter(tail, logger=progress_log), \
                watchdog("coordinator", f"simulation of {n} sites", progress_log) as wd:
            link.start()
            r = link.flwr("run", str(app_dir or default_app_dir()), "sim", "--federation-config", fed_cfg,
                          "--run-config", run_cfg)
            if not r.get("success"):
                raise RuntimeError(f"flwr run failed: {r.get('error-message')}")
            rid = str(r["run-id"])
            stream = subprocess.Popen([link.bin["flwr"], "log", rid, "sim", "--stream"], env=link.env(),
                                      cwd=link.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            reader = threading.Thread(target=_follow_log, args=(stream, out / "run.log", verbose, wd.touch), daemon=True)
            reader.start()
            last_status = time.monotonic()
            while status not in FINISHED:
                time.sleep(0.5)
                if status_check_due(time.monotonic() - last_status, out, stream):  # a `flwr ls` costs ~1.5 s of CPU
                    status, last_status = _run_status(link, rid, status), time.monotonic()
                if link.proc is not None and link.proc.poll() is not None:
                    raise RuntimeError(f"the simulation SuperLink exited with {link.proc.returncode}; see {link.log_path}")
            reader.join(3)  # the stream's last lines; `flwr log --stream` may outlive the run
    finally:
        if stream is not None and stream.poll() is None:
            stream.terminate()
            try:
                stream.wait(10)
            except subprocess.TimeoutExpired:
                stream.kill()
        link.stop()
    wall = time.perf_counter() - t0
    fed_json = out / "federation.json"
    if not fed_json.is_file():
        why = ""
        if (out / "error.json").is_file():
            why = ": " + str(json.loads((out / "error.json").read_text()).get("error"))
        raise RuntimeError(f"the simulation ended ({status or 'unknown'}) without finishing its rounds{why}; "
                           f"see {out}/run.log and {out}/metrics.jsonl")
    summary = json.loads(fed_json.read_text())
    if summary.get("rounds_done") != cfg.federation.rounds:
        raise RuntimeError(f"simulation stopped after {summary.get('rounds_done')} of {cfg.federation.rounds} rounds")
    summary["wall_s"] = round(wall, 2)
    fed_json.write_text(json.dumps(summary, indent=1))
    return summary


def simulate_command(
    config: str | None, sites: int, rounds: int | None, dataset: str | None, data: str | None,
    partition: str | None, alpha: float | None, out: str, local_steps: int | None = None,
    share: str | None = None, verbose: bool = False,
) -> dict[str, Any]:
    console_logging(verbose)
    ov = {"federation.local_steps": local_steps, "federation.share": share}
    cfg = simulation_config(config, sites=sites, rounds=rounds, dataset=dataset, data=data, partition=partition,
                            alpha=alpha, out=out, overrides=ov)
    LOG.info("simulating %d sites x %d rounds (%s partition), output in %s", sites, cfg.federation.rounds,
             cfg.partition.scheme, out)
    return run_simulation(cfg, out, verbose=verbose)
