"""The hospital's Flower ClientApp: local GAN steps on local images, weights out.

Handlers (Flower 1.42 Message API; the records are plan_shared/protocol.py's):

* describe: ``DescribeTask`` -> ``DescribeReply`` (image shape, train-set size, classes): what
  the coordinator needs to build the global model, to tell the pool the federation's
  classes and to name sites in logs.
* train: ``TrainTask`` -> ``TrainReply``: ``local_steps`` GAN steps from the global weights on
  the site's own train split; its weights (``g.*``, ``g_ema.*`` and ``d.*`` when the
  discriminator is shared) with metrics: mean losses, images seen this round, the local
  compute time and ``num_examples`` (the site's train-set size, FedAvg's weight); with
  ``gan.watch_fd_samples`` on, ``fd``: the received global G_ema's FD against a fixed subset of
  the site's train images, computed before the local steps (plan_shared.gan.watch_fd).
* synthesize: ``SynthesisTask`` -> ``SynthesisSummary``; evaluate: ``EvaluationTask`` ->
  ``SiteEvaluation`` (client/post_training.py does the work).
* fedreal: ``FedRealTask`` -> ``FedRealReply`` (a round of the federated-real reference);
  references: ``ReferenceTask`` -> ``ReferenceEvaluation`` (client/fedreal.py does the work).

The run configuration arrives in full with the first task of a run and is kept in the
run's ``Context.state``; later tasks carry its digest only (protocol.site_config). The
node config says who the site is and where its images are (see client/site.py).
Every handler works under a progress reporter (client/progress_rpc.py): stage lines
with elapsed time and ETA reach the demo's terminal in simulation and the SuperNode's
log plus the coordinator (through the pool) in deployment.
Between rounds the site keeps its own trainer state (its discriminator in share=g, the
optimiser moments, the RNG) in its state directory; images never leave the site.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client.progress_rpc import site_progress
from client.site import Site
from plan_shared.config import PlanConfig
from plan_shared.files import atomic_write
from plan_shared.protocol import (
    ConfigRef,
    DescribeReply,
    DescribeTask,
    EvaluationTask,
    FedRealReply,
    FedRealTask,
    ReferenceTask,
    SynthesisTask,
    TrainMetrics,
    TrainReply,
    TrainTask,
    site_config,
)

if TYPE_CHECKING:  # deploy: torch is imported by the handlers that need it (site worker: not at all here)
    import torch

LOG = logging.getLogger("plan.client")

app = ClientApp()


def _task_config(ref: ConfigRef, context: Context) -> PlanConfig:
    """The run configuration a task refers to (validated once, kept in the run's Context state)."""
    return site_config(ref, context.state, "coordinator config")


def _site_for(ref: ConfigRef, context: Context) -> tuple[PlanConfig, Site]:
    """A working task's configuration, with torch's threads set from it, and this node's site."""
    from plan_shared.runtime import set_threads

    cfg = _task_config(ref, context)
    set_threads(cfg.threads)
    return cfg, Site.from_node_config(context.node_config, cfg)


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


@app.query(DescribeTask.ACTION)
def describe(msg: Message, context: Context) -> Message:
    task = DescribeTask.from_record(msg.content)
    site = Site.from_node_config(context.node_config, _task_config(task.config, context))
    ds = site.dataset()
    reply = DescribeReply(site.site_id, int(ds.channels), int(ds.size), int(len(ds.train.labels)), int(ds.num_classes))
    return Message(reply.to_record(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.site_worker import forward  # deploy: run in the warm site worker where plan-client start made one

    if (fwd := forward("train", msg, context)) is not None:
        return fwd
    import torch

    from plan_shared.gan import GanTrainer
    from plan_shared.runtime import resolve_device

    t0 = time.perf_counter()
    task = TrainTask.from_record(msg.content)
    cfg, site = _site_for(task.config, context)
    channels, size, server_round = task.channels, task.size, task.server_round
    share = cfg.federation.share
    device = resolve_device(cfg.device)
    images, n_train = _train_images(site, channels, size)

    trainer = GanTrainer(cfg, channels, size, device)
    state_path = site.trainer_state_path
    restored = False
    if state_path.is_file():
        try:
            sd = torch.load(state_path, map_location="cpu", weights_only=True)
            if sd.get("arch") == {"channels": channels, "size": size} and sd.get("run-digest") == task.run_digest:
                trainer.load_state_dict(sd)
                restored = True
        except Exception as err:  # noqa: BLE001 - a bad local state only costs the local optimiser state
            LOG.warning("%s: ignoring unreadable local state %s (%s)", site.site_id, state_path, err)
    if not restored:
        # Sites share the config seed; give each its own stream of batches and noise.
        s = (cfg.seed * 1_000_003 + zlib.crc32(site.site_id.encode())) % 2**62
        trainer.rng.manual_seed(s)
        torch.manual_seed(s + 1)
    from plan_shared.packing import is_packed, pack_weights, unpack_weights

    trainer.set_weights(unpack_weights(task.weights, trainer.weights(share)))  # deploytrace: packed or not

    fd = fd_s = None
    with site_progress(site) as rep, rep.stage(f"GAN round {server_round}"):
        if (n_fd := cfg.gan.watch_fd_samples) > 0:  # the received global G_ema, before any local step
            from plan_shared.gan import watch_fd, watch_real_subset

            t_fd = time.perf_counter()
            fd = watch_fd(trainer.G_ema, watch_real_subset(images, n_fd, cfg.seed), n_fd, cfg.seed)
            fd_s = time.perf_counter() - t_fd
            LOG.info("%s round %d: FD of the received G_ema %.3f (%d samples, %.2fs)", site.site_id, server_round,
                     fd, n_fd, fd_s)
        t1 = time.perf_counter()
        seen0 = trainer.images_seen
        m = trainer.train_steps(images.to(device), task.local_steps, desc="local GAN steps")
    train_s = time.perf_counter() - t1

    sd = trainer.state_dict()
    sd["run-digest"] = task.run_digest
    site.state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(state_path, lambda fh: torch.save(sd, fh))  # plumbing: plan_shared.files

    metrics = TrainMetrics(
        num_examples=n_train,
        loss_g=float(m.get("loss_g", 0.0)),
        loss_d=float(m.get("loss_d", 0.0)),
        r1=float(m.get("r1", 0.0)),
        d_real=float(m.get("d_real", 0.0)),
        d_fake=float(m.get("d_fake", 0.0)),
        images_seen=int(trainer.images_seen - seen0),
        steps=int(m.get("steps", 0)),
        train_s=float(train_s),
        handler_s=float(time.perf_counter() - t0),
        fd=fd,
        fd_s=fd_s,
    )
    LOG.info("%s round %d: %d steps in %.1fs, loss_g=%.3f loss_d=%.3f", site.site_id, server_round,
             metrics.steps, train_s, metrics.loss_g, metrics.loss_d)
    out = trainer.weights(share)
    reply = TrainReply(pack_weights(out) if is_packed(task.weights) else ArrayRecord(out), metrics, site.site_id)
    return Message(reply.to_record(), reply_to=msg)


@app.query(SynthesisTask.ACTION)
def synthesize(msg: Message, context: Context) -> Message:
    """Phase a: PLAN at this site with the final global generator, export to the pool; numbers back."""
    from client.post_training import synthesize_at_site

    task = SynthesisTask.from_record(msg.content)
    cfg, site = _site_for(task.config, context)
    with site_progress(site):  # the pipeline's stages report into it
        summary = synthesize_at_site(site, cfg, task.generator.to_torch_state_dict(), task.channels, task.size,
                                     task.generator_round, task.method, task.encoder)
    return Message(summary.to_record(), reply_to=msg)


@app.query(EvaluationTask.ACTION)
def evaluate(msg: Message, context: Context) -> Message:
    """Phases c+d: phi_down on the real test split, real reference, privacy audit; numbers back."""
    from client.post_training import evaluate_at_site

    task = EvaluationTask.from_record(msg.content)
    cfg, site = _site_for(task.config, context)
    with site_progress(site) as rep, rep.stage("evaluation"):
        result = evaluate_at_site(site, cfg, task.model.to_torch_state_dict(), task.arch)
    return Message(result.to_record(), reply_to=msg)


# fedreal: the downstream references (issue 11 items 4, 5)
@app.query(FedRealTask.ACTION)
def fedreal(msg: Message, context: Context) -> Message:
    """A round of the federated-real reference: the recipe trained on this site's real train split; weights back."""
    from client.fedreal import fedreal_round

    task = FedRealTask.from_record(msg.content)
    cfg, site = _site_for(task.config, context)
    with site_progress(site) as rep, rep.stage(f"federated real {task.recipe} round {task.server_round}"):
        state, n, train_s = fedreal_round(cfg, site.dataset(), site.site_id, task.recipe,
                                          task.weights.to_torch_state_dict(), task.arch, task.server_round)
    reply = FedRealReply(ArrayRecord(state), n, train_s, site.site_id)
    return Message(reply.to_record(), reply_to=msg)


@app.query(ReferenceTask.ACTION)
def references(msg: Message, context: Context) -> Message:
    """Every recipe's models and its site-alone reference on this site's real test split; scores back."""
    from client.fedreal import evaluate_references

    task = ReferenceTask.from_record(msg.content)
    cfg, site = _site_for(task.config, context)
    models = {key: arrays.to_torch_state_dict() for key, arrays in task.models.items()}
    with site_progress(site) as rep, rep.stage("downstream references"):
        result = evaluate_references(cfg, site.dataset(), site.site_id, models, task.recipes, task.arch)
    return Message(result.to_record(), reply_to=msg)
