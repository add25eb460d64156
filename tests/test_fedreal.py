"""The federated-real reference and the references phase, end to end over Flower's message path.

The coordinator's half (server/downstream.py, server/post_training.py) talks through the one
messaging engine to a small in-process Grid whose nodes are the real ClientApp
(client/app.py, Flower's own dispatch by message type) with a Context each, as virtual
sites of a simulation (partition-id): FedAvg is Flower's, the records are the protocol's.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, Metadata, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from plan_shared.config import PlanConfig, config_from_dict  # noqa: E402
from plan_shared.protocol import FedRealReply, FedRealTask, ReferenceEvaluation, ReferenceTask  # noqa: E402
from server.messaging import Messenger  # noqa: E402
from tests.test_federation_util import tiny_config  # noqa: E402

SUPERLINK = 0
NODES = (21, 22, 23)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 1
    yield


def make_data(path, n_train=60, size=8, seed=0):
    """Two classes a small CNN can tell apart: class 1 has a bright centre square."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 12), ("test", 24)):
        y = rng.integers(0, 2, size=n)
        x = rng.integers(0, 90, size=(n, size, size)).astype(np.uint8)
        x[y == 1, 2:6, 2:6] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y.reshape(-1, 1).astype(np.int64)
    np.savez(path, **arrays)
    return path


def make_cfg(tmp_path, **downstream) -> PlanConfig:
    raw = tiny_config(round_timeout_s=60)
    raw["data"]["path"] = str(make_data(tmp_path / "data.npz"))
    raw["partition"].update(scheme="dirichlet", alpha=0.5, sites=len(NODES))
    raw["coordinator"] = {"state_dir": str(tmp_path / "out")}
    raw["site"] = {"state_dir": str(tmp_path / "out")}
    raw["downstream"] = {"width": 8, "depth": 2, "feature_dim": 16, "epochs": 2, "batch_size": 16,
                         "plain": {"epochs": 1, "batch_size": 16, "stem_stride": 2}, "federated_real": {"rounds": 2},
                         "central_real": True, **downstream}
    return config_from_dict(raw)


class AppGrid:
    """A Grid whose nodes are the real ClientApp, each with its own Context (a virtual site); ``dead`` nodes
    answer with the SuperLink's error."""

    def __init__(self, dead=()):
        self.nodes, self.dead = list(NODES), set(dead)
        self.ctx = {n: Context(run_id=1, node_id=n, node_config={"partition-id": i, "num-partitions": len(NODES)},
                               state=RecordDict(), run_config={}) for i, n in enumerate(NODES)}
        self.pushed: list[Message] = []
        self.replies: list[tuple[int, Message]] = []
        self.ready: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        from client.app import app

        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            m.metadata.__dict__["_message_id"] = mid
            m.metadata.__dict__["_src_node_id"] = SUPERLINK
            self.pushed.append(m)
            nid = m.metadata.dst_node_id
            if nid in self.dead:
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=SUPERLINK, dst_node_id=SUPERLINK,
                              reply_to_message_id=mid, group_id="", created_at=time.time(), ttl=60.0,
                              message_type=m.metadata.message_type)
                reply = make_message(md, error=Error(code=0, reason=f"node {nid} stopped sending heartbeats"))
            else:
                reply = app(m, self.ctx[nid])
                assert not reply.has_error(), reply.error
                self.replies.append((nid, reply))
            self.ready[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(mid) for mid in message_ids if mid in self.ready]


def test_fedavg_rounds_average_the_sites_weights_by_their_image_counts(tmp_path):
    from server.downstream import federated_real

    cfg = make_cfg(tmp_path, recipes=["phi_down"])
    grid = AppGrid()
    arch = {"num_classes": 2, "channels": 1, "size": 8}
    models, info = federated_real(Messenger(grid, cfg, poll_s=0.01), cfg, grid.nodes, arch, 60)

    # One message per site per round per recipe, every one a FedRealTask; the config travels in full once per node.
    assert len(grid.pushed) == len(NODES) * 2
    assert {m.metadata.message_type for m in grid.pushed} == {FedRealTask.MESSAGE_TYPE}
    tasks = [FedRealTask.from_record(m.content) for m in grid.pushed]
    assert sum(t.config.config_json is not None for t in tasks) == len(NODES)
    assert [t.server_round for t in tasks] == [1, 1, 1, 2, 2, 2]
    assert {t.recipe for t in tasks} == {"phi_down"}

    for recipe in ("phi_down",):
        assert info[recipe]["complete"] and len(info[recipe]["history"]) == 2
        last = [FedRealReply.from_record(r.content) for (_, r), t in zip(grid.replies, tasks)
                if t.recipe == recipe and t.server_round == 2]
        counts = [r.num_examples for r in last]
        assert sum(counts) == 60 and len(set(counts)) > 1  # non-IID, unequal sites
        assert info[recipe]["history"][-1]["num_examples"] == 60
        state = models[(recipe, "federated_real")]
        total = float(sum(counts))
        for k, v in state.items():
            mean = sum(r.weights.to_torch_state_dict()[k].double() * (r.num_examples / total) for r in last)
            if v.is_floating_point():
                torch.testing.assert_close(v.double(), mean, atol=1e-5, rtol=1e-5, msg=k)
            else:  # num_batches_tracked stays an integer buffer
                assert v.dtype == torch.int64 and abs(int(v) - float(mean)) <= 1, k


def test_a_dead_site_is_named_and_left_out_of_the_average(tmp_path):
    from server.downstream import federated_real

    cfg = make_cfg(tmp_path, recipes=["phi_down"])
    grid = AppGrid(dead={22})
    models, info = federated_real(Messenger(grid, cfg, poll_s=0.01), cfg, grid.nodes,
                                  {"num_classes": 2, "channels": 1, "size": 8}, 60)
    hist = info["phi_down"]["history"]
    assert info["phi_down"]["complete"] and ("phi_down", "federated_real") in models
    assert all(h["sites"] == ["site-0", "site-2"] for h in hist)
    assert all("22" in h["failed"] and "stopped sending heartbeats" in h["failed"]["22"] for h in hist)


def test_all_sites_dead_gives_no_federated_model(tmp_path):
    from server.downstream import federated_real

    cfg = make_cfg(tmp_path, recipes=["phi_down"])
    grid = AppGrid(dead=set(NODES))
    models, info = federated_real(Messenger(grid, cfg, poll_s=0.01), cfg, grid.nodes,
                                  {"num_classes": 2, "channels": 1, "size": 8}, 60)
    assert models == {} and not info["phi_down"]["complete"] and len(info["phi_down"]["history"]) == 1


def _write_pool(pool_dir, cfg: PlanConfig, n=30):
    """A pulled-pool folder (what ``plan-server pool pull`` writes): PNGs + manifest.json."""
    from plan_shared.data import load_dataset
    from plan_shared.imaging import save_png

    ds = load_dataset(cfg.data, cfg.seed)
    entries = []
    for i in range(n):  # stand-in synthetic images: real test images of the same task (the pool is not the subject)
        rel = f"{int(ds.test.labels[i % len(ds.test)])}/{i:04d}.png"
        (pool_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        save_png(ds.test.images[i % len(ds.test)].transpose(1, 2, 0), pool_dir / rel)
        entries.append({"file": rel, "label": int(ds.test.labels[i % len(ds.test)]), "site_id": f"site-{i % 3}",
                        "method": "plan"})
    (pool_dir / "manifest.json").write_text(json.dumps({"images": entries}))
    return pool_dir


def test_references_phase_scores_every_recipe_and_reference_at_every_site(tmp_path):
    from plan_shared.gan import GanTrainer
    from server.downstream import load_pool, train_downstream
    from server.federation import FederationResult
    from server.post_training import Phases
    from server.report import recipes_section

    cfg = make_cfg(tmp_path, federated_real={"rounds": 1})
    grid = AppGrid(dead={23})
    pool_dir = _write_pool(tmp_path / "pool", cfg)
    pool = load_pool(pool_dir, 2, 1)
    phi_down, down = train_downstream(cfg, pool, 2, 1, 8, progress=False)
    down["pool"] = {"dir": str(pool_dir)}
    result = FederationResult(cfg, tmp_path / "out", GanTrainer(cfg, 1, 8), 1, 8, grid.nodes, {}, {"rounds_done": 1},
                              Messenger(grid, cfg, poll_s=0.01))
    res, info = Phases(result).references(grid.nodes, phi_down, down)

    # The site gets pool, federated real and central real of each recipe; it trains site alone itself.
    ref_tasks = [ReferenceTask.from_record(m.content) for m in grid.pushed
                 if m.metadata.message_type == ReferenceTask.MESSAGE_TYPE]
    assert len(ref_tasks) == len(NODES)
    assert set(ref_tasks[0].models) == {(r, ref) for r in ("phi_down", "plain")
                                        for ref in ("pool", "federated_real", "central_real")}
    assert info["pool"]["phi_down"]["reused"] == "phi_down"  # the pool phi_down is the one trained in phase b
    assert info["central_real"]["plain"]["n_train"] == 60
    torch.testing.assert_close(ref_tasks[0].models[("phi_down", "pool")].to_torch_state_dict()["head.weight"],
                               phi_down.state_dict()["head.weight"])

    assert sorted(res.ok()) == ["site-0", "site-1"] and res.sites["node-23"].node_id == 23
    for e in res.ok().values():
        assert isinstance(e, ReferenceEvaluation)
        # phi_down's site alone is the evaluation phase's reference (not trained twice)
        assert set(e.scores) == {(r, ref) for r in ("phi_down", "plain")
                                 for ref in ("pool", "site_alone", "federated_real", "central_real")} - \
            {("phi_down", "site_alone")}
        n_test = {sc.n for sc in e.scores.values()}
        assert len(n_test) == 1 and all(sc.confusion.sum() == sc.n for sc in e.scores.values())
    sec = recipes_section(res)
    for recipe in ("phi_down", "plain"):
        entry = sec["by_recipe"][recipe]
        assert entry["pool"]["n"] == sum(e.scores[(recipe, "pool")].n for e in res.ok().values())  # pooled
        r = entry["ratio_pool_over"]["central_real"]["accuracy"]
        assert r == pytest.approx(entry["pool"]["accuracy"] / entry["central_real"]["accuracy"])
    assert "node-23" in sec["failed"]


def test_bn_recalibrate_gives_the_federated_model_each_sites_own_statistics(tmp_path):
    from client.evaluate import score_classifier
    from client.fedreal import score_reference
    from client.site import Site
    from plan_shared.classifiers import recalibrate_bn
    from plan_shared.data import to_tensor
    from plan_shared.recipes import make_recipe, state_of

    cfg = make_cfg(tmp_path, recipes=["phi_down"])
    ds = Site.from_node_config({"partition-id": 0, "num-partitions": 3}, cfg).dataset()
    recipe = make_recipe("phi_down", cfg.downstream)
    model = recipe.build(2, 1, 8)
    with torch.no_grad():  # statistics that match no site (what averaging non-IID sites gives)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(50.0)
    state = state_of(model)
    x_te = to_tensor(ds.test.images)

    def expected(recalibrate: bool) -> list:
        m = recipe.build(2, 1, 8)
        m.load_state_dict(state)
        if recalibrate:
            recalibrate_bn(m, to_tensor(ds.train.images))
        return score_classifier(m.eval(), x_te, ds.test.labels, 2)["confusion"]

    fr = cfg.downstream.federated_real
    recal = cfg.model_copy(update={"downstream": cfg.downstream.model_copy(update={
        "federated_real": fr.model_copy(update={"bn": "recalibrate"})})})
    assert fr.bn == "average"  # the default (measured better, see the config)
    assert score_reference(recal, ds, "phi_down", "federated_real", state).confusion.tolist() == expected(True)
    assert score_reference(cfg, ds, "phi_down", "federated_real", state).confusion.tolist() == expected(False)
    # Only the federated model is recalibrated: the pool model is scored as it was trained.
    assert score_reference(recal, ds, "phi_down", "pool", state).confusion.tolist() == expected(False)
    # the stand-in statistics are not the site's: recalibration changes what the model computes
    m_raw, m_own = recipe.build(2, 1, 8), recipe.build(2, 1, 8)
    m_raw.load_state_dict(state)
    m_own.load_state_dict(state)
    recalibrate_bn(m_own, to_tensor(ds.train.images))
    with torch.no_grad():
        assert not torch.allclose(m_raw.eval()(x_te), m_own.eval()(x_te))


def test_models_for_another_image_shape_are_refused_naming_the_site(tmp_path):
    from client.fedreal import fedreal_round
    from client.site import Site

    cfg = make_cfg(tmp_path)
    site = Site.from_node_config({"partition-id": 1, "num-partitions": 3}, cfg)
    with pytest.raises(ValueError, match="site-1: the downstream models expect"):
        fedreal_round(cfg, site.dataset(), site.site_id, "plain", {}, {"num_classes": 2, "channels": 3, "size": 8}, 1)


def test_downstream_seeds_trains_each_recipe_again_per_seed_and_every_site_scores_them(tmp_path):
    from plan_shared.gan import GanTrainer
    from server.downstream import load_pool, train_downstream
    from server.federation import FederationResult
    from server.post_training import Phases
    from server.report import recipes_section

    cfg = make_cfg(tmp_path, seeds=3, central_real=False, federated_real={"enabled": False})
    grid = AppGrid()
    pool_dir = _write_pool(tmp_path / "pool", cfg)
    phi_down, down = train_downstream(cfg, load_pool(pool_dir, 2, 1), 2, 1, 8, progress=False)
    down["pool"] = {"dir": str(pool_dir)}
    result = FederationResult(cfg, tmp_path / "out", GanTrainer(cfg, 1, 8), 1, 8, grid.nodes, {}, {"rounds_done": 1},
                              Messenger(grid, cfg, poll_s=0.01))
    res, info = Phases(result).references(grid.nodes, phi_down, down)

    task = next(ReferenceTask.from_record(m.content) for m in grid.pushed
                if m.metadata.message_type == ReferenceTask.MESSAGE_TYPE)
    assert set(task.models) == {(r, ref) for r in ("phi_down", "plain") for ref in ("pool", "pool_s1", "pool_s2")}
    assert info["pool"]["phi_down"]["reused"] == "phi_down"
    assert {k: v["seed"] for k, v in info["pool"]["plain"]["seeds"].items()} == {"pool_s1": cfg.seed + 1,
                                                                                  "pool_s2": cfg.seed + 2}
    w = [task.models[("phi_down", ref)].to_torch_state_dict()["head.weight"] for ref in ("pool", "pool_s1", "pool_s2")]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # another seed, another model
    for e in res.ok().values():
        assert {("plain", "pool_s1"), ("phi_down", "pool_s2")} <= set(e.scores)
    entry = recipes_section(res)["by_recipe"]["plain"]
    accs = [entry[ref]["accuracy"] for ref in ("pool", "pool_s1", "pool_s2")]
    ps = entry["pool_seeds"]
    assert ps["n_seeds"] == 3 and ps["accuracy"]["values"] == accs
    assert ps["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert ps["accuracy"]["mean_over"]["site_alone"] == pytest.approx(np.mean(accs) / entry["site_alone"]["accuracy"])
    assert set(entry["ratio_pool_over"]) == {"site_alone"}  # the seeds are not references of the pool
