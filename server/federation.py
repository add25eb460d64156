"""Rounds of federated GAN training driven through a Flower ``Grid``.

One round: wait (with a deadline) until enough sites are connected, send the global
weights and the run configuration to each, collect replies until all answered or the
round timeout, average what came back with Flower's FedAvg (weighted by each site's
``num-examples``), then write a global checkpoint, a sample grid and a metrics line.

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
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.gan import GanTrainer

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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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


def collect_replies(grid: Grid, msgs: list[Message], *, min_replies: int, timeout_s: float,
                    grace: Optional[float], min_wait_s: float = 0.0, poll_s: float = 1.0) -> tuple[list[Message], str]:
    """Push ``msgs`` and pull their replies until every one answered or the round is cut short.

    The round is cut at ``timeout_s``, or earlier once ``min_replies`` successful replies
    are in and the others have had ``max(grace x elapsed, min_wait_s)`` more seconds
    (``grace=None`` waits for everyone until ``timeout_s``). Error replies count as
    answers: Flower sends one for a node that stopped sending heartbeats. Returns the
    replies and why the collection ended (``all``, ``grace`` or ``timeout``).
    """
    t0 = time.monotonic()
    pending = {m for m in grid.push_messages(msgs) if m}
    replies: list[Message] = []
    end = t0 + timeout_s
    quorum_at: Optional[float] = None
    while pending:
        got = list(grid.pull_messages(list(pending)))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if not pending:
            return replies, "all"
        now = time.monotonic()
        if quorum_at is None and grace is not None and sum(not r.has_error() for r in replies) >= min_replies:
            quorum_at = now
            end = min(end, now + max(grace * (now - t0), min_wait_s))
            LOG.info("%d site(s) replied after %.1fs; waiting at most %.0fs for %d more", min_replies, now - t0,
                     end - now, len(pending))
        if now >= end:
            return replies, "grace" if quorum_at is not None and end < t0 + timeout_s else "timeout"
        time.sleep(min(poll_s, max(end - now, 0.0)))
    return replies, "all"


WATCH_KEYS = ("d_real", "d_fake", "r1", "loss_d", "loss_g")


def watch_points(aggregate: dict[str, Any]) -> dict[str, float]:
    """The per-round signs of GAN health, from the FedAvg-weighted site metrics.

    ``d_real``/``d_fake``: D's mean logit on real and on generated images over the sites'
    local steps; ``d_gap`` = their difference (grows when D wins, i.e. G is falling behind or
    D overfits the few local images); ``r1``: mean R1 penalty of the steps that computed it.
    """
    w = {k: float(aggregate[k]) for k in WATCH_KEYS if k in aggregate}
    if "d_real" in w and "d_fake" in w:
        w["d_gap"] = w["d_real"] - w["d_fake"]
    return w


class Federation:
    """Owns the global GanTrainer, the output directory and the round loop."""

    def __init__(self, grid: Grid, cfg: PlanConfig, out_dir: str | Path, expected_nodes: int = 0,
                 on_round: Optional[Callable[[dict[str, Any]], None]] = None):
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
                               weighted_by_key="num-examples")
        self.site_names: dict[int, str] = {}

    # ------------------------------------------------------------------ messages
    def _base_config(self, channels: int = 0, size: int = 0) -> dict[str, Any]:
        return {
            "plan-config": json.dumps(self.cfg.to_dict()),
            "run-digest": self.digest,
            "channels": channels,
            "size": size,
            "local-steps": self.cfg.federation.local_steps,
        }

    def describe(self, node_ids: list[int]) -> tuple[int, int]:
        """Ask each site for its image shape; all must agree with each other and the config."""
        msgs = [
            Message(RecordDict({"config": ConfigRecord(self._base_config())}),
                    message_type=f"{MessageType.QUERY}.describe", dst_node_id=nid)
            for nid in node_ids
        ]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout_s))
        shapes = set()
        for r in replies:
            if r.has_error():
                LOG.warning("site node %d failed to describe itself: %s", r.metadata.src_node_id, r.error.reason)
                continue
            s = r.content["site"]
            self.site_names[r.metadata.src_node_id] = str(s["site-id"])
            shapes.add((int(s["channels"]), int(s["size"])))
            LOG.info("site %s (node %d): %d train images, %dx%d, %d channel(s)", s["site-id"],
                     r.metadata.src_node_id, int(s["num-train"]), int(s["size"]), int(s["size"]), int(s["channels"]))
        if not shapes:
            raise FederationError("no site answered the describe query; see the SuperNode logs of the sites")
        if len(shapes) > 1:
            raise FederationError(f"sites disagree on image shape {sorted(shapes)}: set data.size and data.channels")
        channels, size = shapes.pop()
        if self.cfg.data.channels not in (None, channels) or self.cfg.data.size not in (None, size):
            raise FederationError(f"sites deliver {channels}x{size}px, the config asks {self.cfg.data.channels}x{self.cfg.data.size}")
        return channels, size

    # ------------------------------------------------------------------ checkpoints
    def latest(self) -> Optional[dict[str, Any]]:
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

    def last_round_record(self) -> Optional[dict[str, Any]]:
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
        _write_json_atomic(self.ckpt_dir / "latest.json", {
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
    def run(self) -> dict[str, Any]:
        fed = self.cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.latest()
        start = 1
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
        if self.cfg.data.channels and self.cfg.data.size:
            # Shape fixed by the config: skip a round trip (each message costs a ClientApp start in
            # deployment); a site with other images fails its train step with a clear message.
            channels, size = self.cfg.data.channels, self.cfg.data.size
        else:
            channels, size = self.describe(node_ids)
        device = torch.device("cpu")
        if meta is not None:
            trainer = GanTrainer.from_checkpoint(self.ckpt_dir / meta["checkpoint"], device)
            if (trainer.channels, trainer.size) != (channels, size):
                raise FederationError(f"checkpoint is {trainer.channels}x{trainer.size}, sites deliver {channels}x{size}")
            start = int(meta["round"]) + 1
            LOG.info("resuming from %s: round %d done, continuing with round %d of %d",
                     meta["checkpoint"], meta["round"], start, fed.rounds)
        else:
            trainer = GanTrainer(self.cfg, channels, size, device)
        base = self._base_config(channels, size)
        summary: dict[str, Any] = {"rounds_done": start - 1, "rounds": fed.rounds, "history": []}
        for rnd in range(start, fed.rounds + 1):
            t0 = time.perf_counter()
            node_ids = wait_for_nodes(self.grid, fed.min_nodes, fed.min_nodes, fed.wait_for_nodes_s)
            arrays = ArrayRecord(trainer.weights(fed.share))
            conf = ConfigRecord({**base, "server-round": rnd})
            msgs = [Message(RecordDict({"arrays": arrays, "config": conf}), message_type=MessageType.TRAIN,
                            dst_node_id=nid) for nid in node_ids]
            sent_at = time.perf_counter()
            replies, ended = collect_replies(self.grid, msgs, min_replies=fed.min_nodes, timeout_s=fed.round_timeout_s,
                                             grace=fed.straggler_grace, min_wait_s=fed.straggler_min_wait_s,
                                             poll_s=fed.reply_poll_s)  # deploy: reply poll from config
            waited = time.perf_counter() - sent_at
            ok = [r for r in replies if not r.has_error()]
            answered = {r.metadata.src_node_id for r in ok}
            missing = [nid for nid in node_ids if nid not in answered]
            # Flower's error replies come from the SuperLink: map them back through the message ids.
            dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
            errors = {dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r.error.reason
                      for r in replies if r.has_error()}
            late = (f"still training when the round closed after {waited:.0f}s (straggler grace)" if ended == "grace"
                    else f"no reply within round_timeout_s={fed.round_timeout_s:.0f}s")
            for nid in missing:
                LOG.warning("round %d: site %s (node %d) did not contribute: %s", rnd, self.site_names.get(nid, "?"),
                            nid, errors.get(nid, late))
            if len(ok) < fed.min_nodes:
                raise FederationError(
                    f"round {rnd}: only {len(ok)} of {len(node_ids)} sites returned weights, federation.min_nodes="
                    f"{fed.min_nodes}; the last good global model is round {rnd - 1}"
                )
            agg_arrays, agg_metrics = self.strategy.aggregate_train(rnd, ok)
            if agg_arrays is None:
                raise FederationError(f"round {rnd}: aggregation produced nothing")
            trainer.set_weights(agg_arrays.to_torch_state_dict())
            trainer.step += fed.local_steps
            sites = []
            for r in ok:
                m = dict(next(iter(r.content.metric_records.values())))
                name = str(r.content["site"]["site-id"]) if "site" in r.content.config_records else "?"
                self.site_names[r.metadata.src_node_id] = name
                sites.append({"site": name, "node_id": r.metadata.src_node_id, **m})
            trainer.images_seen += int(sum(s.get("images-seen", 0) for s in sites))
            ckpt = self.save(trainer, rnd)
            trainer.sample_grid(self.sample_dir / f"round-{rnd:04d}.png", n=fed.sample_grid, seed=self.cfg.seed)
            wall = time.perf_counter() - t0
            rec = {
                "round": rnd,
                "wall_s": round(wall, 3),
                "sites_sent": len(node_ids),
                "sites_replied": len(ok),
                "collect_s": round(waited, 3),
                "ended": ended,
                "missing": [{"node_id": n, "site": self.site_names.get(n, "?"), "reason": errors.get(n, late)}
                            for n in missing],
                "aggregate": dict(agg_metrics) if agg_metrics is not None else {},
                "watch": watch_points(dict(agg_metrics) if agg_metrics is not None else {}),
                "sites": sorted(sites, key=lambda s: s["site"]),
                "checkpoint": str(ckpt),
                "time": time.time(),
            }
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            agg = rec["aggregate"]
            LOG.info("round %d/%d done in %.1fs: %d/%d sites, loss_g=%.3f loss_d=%.3f%s", rnd, fed.rounds, wall,
                     len(ok), len(node_ids), agg.get("loss_g", float("nan")), agg.get("loss_d", float("nan")),
                     f", missing {[m['site'] for m in rec['missing']]}" if missing else "")
            summary["rounds_done"] = rnd
            summary["history"].append({k: rec[k] for k in ("round", "wall_s", "sites_replied", "missing")})
            if self.on_round is not None:
                self.on_round(rec)
        # What the post-training phases (server/phases.py) continue from.
        self.trainer, self.channels, self.size = trainer, channels, size
        self.node_ids = wait_for_nodes(self.grid, fed.min_nodes, fed.min_nodes, fed.wait_for_nodes_s)
        return summary


def load_run_config(run_config: dict[str, Any]) -> tuple[PlanConfig, Path, int]:
    """(config, output dir, expected nodes) from a Flower run_config merged over defaults.

    Keys (declared in pyproject.toml ``[tool.flwr.app.config]``): ``plan-config``
    (YAML path, or JSON text starting with ``{``; empty = defaults), ``out-dir``
    (empty = ``federation.state_dir``), ``num-server-rounds`` (> 0 overrides
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
    out = Path(str(rc["out-dir"]) or cfg.federation.state_dir)
    return cfg, out, int(rc["expected-nodes"])
