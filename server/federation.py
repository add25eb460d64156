"""Rounds of federated GAN training driven through a Flower ``Grid``.

One round: wait (with a deadline) until enough sites are connected, send a ``TrainTask``
(plan_shared/protocol.py: global weights, packed into one array by plan_shared/packing.py
unless ``federation.pack_weights`` is off, round, the run configuration's digest, the
configuration itself only to a node that lacks it) to each through server/messaging.py,
collect replies until all answered or the round is cut (timeout, straggler grace),
average what came back with Flower's FedAvg (weighted by each site's ``num-examples``),
then write a global checkpoint, a sample grid and a metrics line. :meth:`Federation.run`
returns a :class:`FederationResult` that the post-training phases take as they are.

Sites that did not answer (killed, disconnected, late, crashed) are logged by name and
recorded in ``metrics.jsonl``; the round proceeds as long as ``federation.min_nodes``
replies arrived. A restarted coordinator reads ``checkpoints/latest.json`` and
continues after the last completed round.

Layout of the output directory::

    checkpoints/round-0003.pt   GanTrainer checkpoint (G, G_ema, D, round config)
    checkpoints/latest.json     {round, checkpoint, share, d_shared, run_digest, config}
    samples/round-0003.png      G_ema sample grid after the round
    metrics.jsonl               one JSON object per round (per-site metrics, missing sites,
                                "watch": D logits real/fake and their gap, R1, losses)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.files import atomic_write
from plan_shared.gan import GanTrainer
from plan_shared.packing import pack_weights, unpack_weights
from plan_shared.protocol import ConfigRef, DescribeReply, DescribeTask, TrainMetrics, TrainReply, TrainTask
from server.messaging import Messenger, WaitPolicy
from server.server_opt import ServerOptimizer, optimised_names

LOG = logging.getLogger("plan.federation")


class FederationError(RuntimeError):
    """The federation cannot proceed (too few sites, inconsistent sites); the message says why."""


def run_digest(cfg: PlanConfig) -> str:
    """Hash of what must not change across a resume (models, GAN, sharing, data shape, seed)."""
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("seed", "generator", "discriminator", "gan")}
    keep["share"] = d["federation"]["share"]
    keep["data"] = {k: d["data"][k] for k in ("size", "channels")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1))  # plumbing: plan_shared.files


def wait_for_nodes(grid: Grid, want: int, need: int, deadline_s: float, poll_s: float = 1.0) -> list[int]:
    """Node ids once ``want`` are connected; after ``deadline_s`` settle for ``need``, else fail."""
    t0 = time.monotonic()
    last = -1
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= want:
            return ids
        waited = time.monotonic() - t0
        if waited >= deadline_s:
            if len(ids) >= need:
                LOG.warning("only %d of %d expected sites connected after %.0fs; proceeding", len(ids), want, waited)
                return ids
            raise FederationError(
                f"only {len(ids)} site(s) connected after waiting {waited:.0f}s, the federation needs at least "
                f"{need} (federation.min_nodes). Check that the hospitals ran `plan-client start`, that their keys "
                f"are registered, and that they can reach the proxy (federation.wait_for_nodes_s to wait longer)."
            )
        if len(ids) != last:
            LOG.info("waiting for sites: %d connected, waiting for %d (deadline in %.0fs)", len(ids), want, deadline_s - waited)
            last = len(ids)
        time.sleep(poll_s)


WATCH_KEYS = ("d_real", "d_fake", "r1", "loss_d", "loss_g", "fd")


def watch_points(aggregate: dict[str, Any]) -> dict[str, float]:
    """The per-round signs of GAN health, from the FedAvg-weighted site metrics.

    ``d_real``/``d_fake``: D's mean logit on real and on generated images over the sites'
    local steps; ``d_gap`` = their difference (grows when D wins, i.e. G is falling behind or
    D overfits the few local images); ``r1``: mean R1 penalty of the steps that computed it;
    ``fd`` (when ``gan.watch_fd_samples`` is on): the sites' FD of the global G_ema they received
    this round against their own real images, in a fixed feature space (plan_shared.gan.watch_fd).
    """
    w = {k: float(aggregate[k]) for k in WATCH_KEYS if k in aggregate}
    if "d_real" in w and "d_fake" in w:
        w["d_gap"] = w["d_real"] - w["d_fake"]
    return w


@dataclass
class FederationResult:
    """What the rounds leave for the post-training phases (server/post_training.py), like Flower's ``Result``.

    ``summary``: ``{rounds_done, rounds, history}`` (also ``federation.json``); ``node_ids``:
    the sites connected at the end; ``messenger``: the channel to them (it knows which
    node already holds the run configuration).
    """

    cfg: PlanConfig
    out: Path
    trainer: GanTrainer
    channels: int
    size: int
    node_ids: list[int]
    site_names: dict[int, str]
    summary: dict[str, Any]
    messenger: Messenger
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def rounds_done(self) -> int:
        return int(self.summary["rounds_done"])

    def g_ema(self) -> dict[str, torch.Tensor]:
        """The final global generator's EMA weights (``g_ema.*``)."""
        return {k: v for k, v in self.trainer.weights("g").items() if k.startswith("g_ema.")}


class Federation:
    """Owns the global GanTrainer, the output directory and the round loop."""

    def __init__(self, grid: Grid, cfg: PlanConfig, out_dir: str | Path, expected_nodes: int = 0,
                 on_round: Callable[[dict[str, Any]], None] | None = None):
        self.grid, self.cfg = grid, cfg
        self.out = Path(out_dir).resolve()
        self.ckpt_dir = self.out / "checkpoints"
        self.sample_dir = self.out / "samples"
        self.metrics_path = self.out / "metrics.jsonl"
        fed = cfg.federation
        self.expected = max(expected_nodes, fed.min_nodes)
        self.digest = run_digest(cfg)
        self.on_round = on_round
        self.strategy = FedAvg(min_train_nodes=fed.min_nodes, min_available_nodes=fed.min_nodes,
                               weighted_by_key=TrainMetrics.WEIGHT_KEY)
        self.messenger = Messenger(grid, cfg)
        self.site_names: dict[int, str] = {}
        self.server_opt: ServerOptimizer | None = None  # built with the trainer (_start)

    # ------------------------------------------------------------------ messages
    def describe(self, node_ids: list[int]) -> tuple[int, int]:
        """Ask each site for its image shape; all must agree with each other and the config."""
        ex = self.messenger.exchange(node_ids, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record,
                                     WaitPolicy(self.cfg.federation.round_timeout_s))
        for nid in ex.missing():
            LOG.warning("site node %d failed to describe itself: %s", nid,
                        ex.reason(nid, f"no reply within {self.cfg.federation.round_timeout_s:.0f}s"))
        shapes = set()
        for nid, s in ex.replies.items():
            self.site_names[nid] = s.site_id
            shapes.add((s.channels, s.size))
            LOG.info("site %s (node %d): %d train images, %dx%d, %d channel(s)", s.site_id, nid, s.num_train, s.size,
                     s.size, s.channels)
        if not shapes:
            raise FederationError("no site answered the describe query; see the SuperNode logs of the sites")
        if len(shapes) > 1:
            raise FederationError(f"sites disagree on image shape {sorted(shapes)}: set data.size and data.channels")
        channels, size = shapes.pop()
        if self.cfg.data.channels not in (None, channels) or self.cfg.data.size not in (None, size):
            raise FederationError(f"sites deliver {channels}x{size}px, the config asks {self.cfg.data.channels}x{self.cfg.data.size}")
        return channels, size

    # ------------------------------------------------------------------ checkpoints
    def latest(self) -> dict[str, Any] | None:
        p = self.ckpt_dir / "latest.json"
        if not p.is_file():
            return None
        meta = json.loads(p.read_text())
        if meta.get("run_digest") != self.digest:
            raise FederationError(
                f"{self.out} holds a run with a different model/GAN configuration (digest {meta.get('run_digest')} "
                f"!= {self.digest}); use another output directory or the original configuration"
            )
        return meta

    def last_round_record(self) -> dict[str, Any] | None:
        """The last line of metrics.jsonl (None when there is none or it is unreadable)."""
        if not self.metrics_path.is_file():
            return None
        lines = [x for x in self.metrics_path.read_text().splitlines() if x.strip()]
        try:
            return json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            return None

    def save(self, trainer: GanTrainer, rnd: int) -> Path:
        path = trainer.save_checkpoint(self.ckpt_dir / f"round-{rnd:04d}.pt")
        opt_file = None
        if self.server_opt is not None and self.server_opt.kind != "none":
            opt_file = self.server_opt.save(self.ckpt_dir / f"server-opt-{rnd:04d}.pt").name
        _write_json_atomic(self.ckpt_dir / "latest.json", {
            "server_opt": self.cfg.federation.server_opt,
            "server_opt_state": opt_file,
            "round": rnd,
            "rounds": self.cfg.federation.rounds,
            "checkpoint": path.name,
            "share": self.cfg.federation.share,
            "d_shared": self.cfg.federation.share == "gd",
            "run_digest": self.digest,
            "config": self.cfg.to_dict(),
        })
        return path

    # ------------------------------------------------------------------ rounds
    def _start(self) -> tuple[GanTrainer, int, int, int]:
        """(trainer, channels, size, first round): fresh, or resumed from ``checkpoints/latest.json``."""
        fed = self.cfg.federation
        meta = self.latest()
        want = self.expected
        if meta is not None:
            # A site that had dropped out before the restart should not hold the resumed run up
            # for wait_for_nodes_s: wait for the sites of the last completed round (others that
            # reconnect join the next round).
            last = self.last_round_record()
            if last is not None and last.get("sites_replied", want) < want:
                want = max(fed.min_nodes, int(last["sites_replied"]))
                LOG.info("resuming: waiting for the %d site(s) of round %d, not all %d expected", want, last["round"],
                         self.expected)
        node_ids = wait_for_nodes(self.grid, want, fed.min_nodes, fed.wait_for_nodes_s)
        channels: int
        size: int
        if self.cfg.data.channels and self.cfg.data.size:
            # Shape fixed by the config: skip a round trip (each message costs a ClientApp start in
            # deployment); a site with other images fails its train step with a clear message.
            channels, size = self.cfg.data.channels, self.cfg.data.size
        else:
            channels, size = self.describe(node_ids)
        device = torch.device("cpu")
        if meta is None:
            trainer = GanTrainer(self.cfg, channels, size, device)
            self.server_opt = self.make_server_opt(trainer)
            return trainer, channels, size, 1
        trainer = GanTrainer.from_checkpoint(self.ckpt_dir / meta["checkpoint"], device)
        self.server_opt = self.make_server_opt(trainer, meta)
        if (trainer.channels, trainer.size) != (channels, size):
            raise FederationError(f"checkpoint is {trainer.channels}x{trainer.size}, sites deliver {channels}x{size}")
        start = int(meta["round"]) + 1
        LOG.info("resuming from %s: round %d done, continuing with round %d of %d",
                 meta["checkpoint"], meta["round"], start, fed.rounds)
        return trainer, channels, size, start

    def make_server_opt(self, trainer: GanTrainer, meta: dict[str, Any] | None = None) -> ServerOptimizer:
        """The server optimiser of ``federation.server_opt``, with its state from ``meta`` (latest.json) on resume."""
        fed = self.cfg.federation
        opt = ServerOptimizer(fed, optimised_names((k for k, _ in trainer.G.named_parameters()),
                                                   (k for k, _ in trainer.D.named_parameters()), fed.share))
        if meta is not None and opt.kind != "none":
            state = meta.get("server_opt_state")
            if state and meta.get("server_opt") == opt.kind:
                opt.load(self.ckpt_dir / state)
            else:
                LOG.warning("resuming with federation.server_opt=%s but round %s kept no %s state: starting it afresh",
                            opt.kind, meta.get("round"), opt.kind)
        return opt

    def _round(self, trainer: GanTrainer, rnd: int, channels: int, size: int) -> dict[str, Any]:
        """One round: send, collect, average, checkpoint; returns its metrics.jsonl record."""
        fed = self.cfg.federation
        t0 = time.perf_counter()
        node_ids = wait_for_nodes(self.grid, fed.min_nodes, fed.min_nodes, fed.wait_for_nodes_s)
        current = trainer.weights(fed.share)
        arrays = pack_weights(current) if fed.pack_weights else ArrayRecord(current)  # deploytrace: few objects

        def task(nid: int, ref: ConfigRef) -> TrainTask:
            return TrainTask(arrays, rnd, channels, size, fed.local_steps, self.digest, ref)

        ex = self.messenger.exchange(node_ids, task, TrainReply.from_record,
                                     WaitPolicy(fed.round_timeout_s, fed.min_nodes, fed.straggler_grace,
                                                fed.straggler_min_wait_s))
        late = (f"still training when the round closed after {ex.elapsed_s:.0f}s (straggler grace)" if ex.ended == "grace"
                else f"no reply within round_timeout_s={fed.round_timeout_s:.0f}s")
        missing = ex.missing()
        for nid in missing:
            LOG.warning("round %d: site %s (node %d) did not contribute: %s", rnd, self.site_names.get(nid, "?"),
                        nid, ex.reason(nid, late))
        if len(ex.replies) < fed.min_nodes:
            raise FederationError(
                f"round {rnd}: only {len(ex.replies)} of {len(node_ids)} sites returned weights, federation.min_nodes="
                f"{fed.min_nodes}; the last good global model is round {rnd - 1}"
            )
        agg_arrays, agg_metrics = self.strategy.aggregate_train(
            rnd, ex.ordered_messages(lambda r: r.site_id))  # by site, not by arrival: same seed, same G
        if agg_arrays is None:
            raise FederationError(f"round {rnd}: aggregation produced nothing")
        average = unpack_weights(agg_arrays, current)  # deploytrace:
        assert self.server_opt is not None
        trainer.set_weights(self.server_opt.step(current, average))
        trainer.step += fed.local_steps
        sites = []
        for nid, r in ex.replies.items():
            self.site_names[nid] = r.site_id
            sites.append({"site": r.site_id, "node_id": nid, **r.metrics.as_dict()})
        trainer.images_seen += int(sum(r.metrics.images_seen for r in ex.replies.values()))
        ckpt = self.save(trainer, rnd)
        trainer.sample_grid(self.sample_dir / f"round-{rnd:04d}.png", n=fed.sample_grid, seed=self.cfg.seed)
        aggregate = dict(agg_metrics) if agg_metrics is not None else {}
        return {
            "round": rnd,
            "wall_s": round(time.perf_counter() - t0, 3),
            "sites_sent": len(node_ids),
            "sites_replied": len(ex.replies),
            "collect_s": round(ex.elapsed_s, 3),
            "ended": ex.ended,
            "missing": [{"node_id": n, "site": self.site_names.get(n, "?"), "reason": ex.reason(n, late)}
                        for n in missing],
            "aggregate": aggregate,
            "watch": watch_points(aggregate),
            "sites": sorted(sites, key=lambda s: s["site"]),
            "checkpoint": str(ckpt),
            "time": time.time(),
        }

    def run(self) -> FederationResult:
        fed = self.cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        trainer, channels, size, start = self._start()
        summary: dict[str, Any] = {"rounds_done": start - 1, "rounds": fed.rounds, "history": []}
        for rnd in range(start, fed.rounds + 1):
            rec = self._round(trainer, rnd, channels, size)
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            agg = rec["aggregate"]
            LOG.info("round %d/%d done in %.1fs: %d/%d sites, loss_g=%.3f loss_d=%.3f%s", rnd, fed.rounds,
                     rec["wall_s"], rec["sites_replied"], rec["sites_sent"], agg.get("loss_g", float("nan")),
                     agg.get("loss_d", float("nan")),
                     f", missing {[m['site'] for m in rec['missing']]}" if rec["missing"] else "")
            summary["rounds_done"] = rnd
            summary["history"].append({k: rec[k] for k in ("round", "wall_s", "sites_replied", "missing")})
            if self.on_round is not None:
                self.on_round(rec)
        node_ids = wait_for_nodes(self.grid, fed.min_nodes, fed.min_nodes, fed.wait_for_nodes_s)
        return FederationResult(self.cfg, self.out, trainer, channels, size, node_ids, self.site_names, summary,
                                self.messenger,
                                timing={"federation_s": round(sum(h["wall_s"] for h in summary["history"]), 2)})


def load_run_config(run_config: dict[str, Any]) -> tuple[PlanConfig, Path, int]:
    """(config, output dir, expected nodes) from a Flower run_config merged over defaults.

    Keys (declared in pyproject.toml ``[tool.flwr.app.config]``): ``plan-config``
    (YAML path, or JSON text starting with ``{``; empty = defaults), ``out-dir``
    (empty = ``coordinator.state_dir``), ``num-server-rounds`` (> 0 overrides
    ``federation.rounds``), ``expected-nodes`` (wait for this many sites at the start).
    """
    from plan_shared.config import load_config

    rc: dict[str, Any] = {"plan-config": "", "out-dir": "", "num-server-rounds": 0, "expected-nodes": 0}
    rc.update({k: v for k, v in (run_config or {}).items() if v not in (None, "")})
    src = str(rc["plan-config"]).strip()
    if src.startswith("{"):
        cfg = config_from_dict(json.loads(src), "run-config plan-config")
    else:
        cfg = load_config(src or None)
    if int(rc["num-server-rounds"]) > 0:
        cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": int(rc["num-server-rounds"])})})
    out = Path(str(rc["out-dir"]) or cfg.coordinator.state_dir)
    return cfg, out, int(rc["expected-nodes"])
