"""The hospital's Flower ClientApp: local GAN steps on local images, weights out.

Handlers (Flower 1.42 Message API):

* ``query.describe`` -> ``{"site": {site-id, channels, size, num-train, num-classes}}``: what
  the coordinator needs to build the global model (image shape), to tell the pool the
  federation's classes and to name sites in logs.
* ``train`` -> runs ``federation.local_steps`` GAN steps from the global weights on the
  site's own train split and returns its weights (``g.*``, ``g_ema.*`` and ``d.*`` when
  the discriminator is shared) with metrics: mean losses, images seen this round, the
  local compute time and ``num-examples`` (the site's train-set size, FedAvg's weight).

The whole run configuration arrives with each message (``config["plan-config"]``, JSON);
the node config says who the site is and where its images are (see client/site.py).
Every handler works under a progress reporter (client/progress_rpc.py): stage lines
with elapsed time and ETA reach the demo's terminal in simulation and the SuperNode's
log plus the coordinator (through the pool) in deployment.
Between rounds the site keeps its own trainer state (its discriminator in share=g, the
optimiser moments, the RNG) in its state directory; images never leave the site.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plan_shared.config import PlanConfig, config_from_dict

from client.progress_rpc import site_progress
from client.site import Site

if TYPE_CHECKING:  # deploy: torch is imported by the handlers that need it (site worker: not at all here)
    import torch

LOG = logging.getLogger("plan.client")

app = ClientApp()


def _run_config(msg: Message) -> tuple[PlanConfig, ConfigRecord]:
    conf = msg.content["config"]
    cfg = config_from_dict(json.loads(str(conf["plan-config"])), "coordinator config")
    return cfg, conf


def _train_images(site: Site, channels: int, size: int) -> tuple[torch.Tensor, int]:
    from plan_shared.data import to_tensor

    ds = site.dataset()
    x = to_tensor(ds.train.images)
    if tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(
            f"{site.site_id}: local images are {tuple(x.shape[1:])}, the federation trains "
            f"{(channels, size, size)}; set data.size/data.channels in the coordinator config"
        )
    return x, int(x.shape[0])


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    cfg, _ = _run_config(msg)
    site = Site.from_node_config(context.node_config, cfg)
    ds = site.dataset()
    rec = ConfigRecord(
        {
            "site-id": site.site_id,
            "channels": int(ds.channels),
            "size": int(ds.size),
            "num-train": int(len(ds.train.labels)),
            "num-classes": int(ds.num_classes),
        }
    )
    return Message(RecordDict({"site": rec}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.site_worker import forward  # deploy: run in the warm site worker where plan-client start made one

    if (fwd := forward("train", msg, context)) is not None:
        return fwd
    import torch

    from plan_shared.gan import GanTrainer
    from plan_shared.runtime import resolve_device, set_threads

    t0 = time.perf_counter()
    cfg, conf = _run_config(msg)
    set_threads(cfg.threads)
    site = Site.from_node_config(context.node_config, cfg)
    channels, size = int(conf["channels"]), int(conf["size"])
    server_round = int(conf.get("server-round", 0))
    share = cfg.federation.share
    device = resolve_device(cfg.device)
    images, n_train = _train_images(site, channels, size)

    trainer = GanTrainer(cfg, channels, size, device)
    state_path = site.trainer_state_path
    restored = False
    if state_path.is_file():
        try:
            sd = torch.load(state_path, map_location="cpu", weights_only=True)
            if sd.get("arch") == {"channels": channels, "size": size} and sd.get("run-digest") == conf.get("run-digest"):
                trainer.load_state_dict(sd)
                restored = True
        except Exception as err:  # noqa: BLE001 - a bad local state only costs the local optimiser state
            LOG.warning("%s: ignoring unreadable local state %s (%s)", site.site_id, state_path, err)
    if not restored:
        # Sites share the config seed; give each its own stream of batches and noise.
        s = (cfg.seed * 1_000_003 + zlib.crc32(site.site_id.encode())) % 2**62
        trainer.rng.manual_seed(s)
        torch.manual_seed(s + 1)
    trainer.set_weights(msg.content["arrays"].to_torch_state_dict())

    t1 = time.perf_counter()
    seen0 = trainer.images_seen
    with site_progress(site) as rep, rep.stage(f"GAN round {server_round}"):
        m = trainer.train_steps(images.to(device), int(conf["local-steps"]), desc="local GAN steps")
    train_s = time.perf_counter() - t1

    sd = trainer.state_dict()
    sd["run-digest"] = conf.get("run-digest")
    site.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_suffix(".tmp")
    torch.save(sd, tmp)
    tmp.replace(state_path)

    metrics = MetricRecord(
        {
            "num-examples": n_train,
            "loss_g": float(m.get("loss_g", 0.0)),
            "loss_d": float(m.get("loss_d", 0.0)),
            "r1": float(m.get("r1", 0.0)),
            "d_real": float(m.get("d_real", 0.0)),
            "d_fake": float(m.get("d_fake", 0.0)),
            "images-seen": int(trainer.images_seen - seen0),
            "steps": int(m.get("steps", 0)),
            "train-s": float(train_s),
            "handler-s": float(time.perf_counter() - t0),
        }
    )
    LOG.info("%s round %d: %d steps in %.1fs, loss_g=%.3f loss_d=%.3f", site.site_id, server_round,
             int(m.get("steps", 0)), train_s, metrics["loss_g"], metrics["loss_d"])
    reply = RecordDict(
        {
            "arrays": ArrayRecord(trainer.weights(share)),
            "metrics": metrics,
            "site": ConfigRecord({"site-id": site.site_id}),
        }
    )
    return Message(reply, reply_to=msg)


@app.query("synthesize")
def synthesize(msg: Message, context: Context) -> Message:
    """Phase a: PLAN at this site with the final global generator, export to the pool; numbers back."""
    from client.phases import synthesize_at_site
    from plan_shared.runtime import set_threads

    cfg, conf = _run_config(msg)
    set_threads(cfg.threads)
    site = Site.from_node_config(context.node_config, cfg)
    with site_progress(site):  # the pipeline's stages report into it
        res = synthesize_at_site(site, cfg, msg.content["arrays"].to_torch_state_dict(), int(conf["channels"]),
                                 int(conf["size"]), int(conf["generator-round"]), str(conf["method"]))
    reply = RecordDict({
        "metrics": MetricRecord(res["metrics"]),
        "site": ConfigRecord({"site-id": site.site_id, "bundle-id": res["export"]["bundle_id"],
                              "export-status": res["export"]["status"]}),
    })
    return Message(reply, reply_to=msg)


@app.query("evaluate")
def evaluate(msg: Message, context: Context) -> Message:
    """Phases c+d: phi_down on the real test split, real reference, privacy audit; numbers back."""
    from client.phases import evaluate_at_site
    from plan_shared.runtime import set_threads

    cfg, conf = _run_config(msg)
    set_threads(cfg.threads)
    site = Site.from_node_config(context.node_config, cfg)
    arch = {k: int(conf[f"arch-{k}"]) for k in ("num_classes", "channels", "size")}
    with site_progress(site) as rep, rep.stage("evaluation"):
        metrics = evaluate_at_site(site, cfg, msg.content["arrays"].to_torch_state_dict(), arch)
    reply = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site.site_id})})
    return Message(reply, reply_to=msg)
