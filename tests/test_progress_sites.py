"""The reporter at the site: the pipeline's stages and loops, the ClientApp handlers in simulation."""

from __future__ import annotations

import pytest

from plan_shared import progress as P
from plan_shared.config import config_from_dict
from tests.test_federation_util import make_npz, tiny_config


def test_pipeline_reports_every_stage_in_order_with_loop_progress(tmp_path):
    from client.pipeline import pipeline_stages, run_site_pipeline
    from plan_shared.data import load_dataset
    from plan_shared.gan import GanTrainer
    from tests.test_synthesize import TINY, _npz  # the pipeline's tiny budgets

    cfg = config_from_dict(dict(TINY, data={"source": "medmnist", "path": str(_npz(tmp_path / "d.npz")), "size": 16},
                                synthesis=dict(TINY["synthesis"], compare=False)))
    ds = load_dataset(cfg.data, cfg.seed)
    ckpt = GanTrainer(cfg, 1, 16).save_checkpoint(tmp_path / "g.pt")
    events: list[dict] = []
    rep = P.Reporter("site-x", [events.append], interval_s=1e-6, heartbeat=False)  # every update is a line
    run_site_pipeline(cfg, ds, ckpt, tmp_path / "out", progress=False, reporter=rep)
    starts = [e["stage"] for e in events if e["event"] == "start"]
    assert starts == pipeline_stages(cfg) and "compare" not in starts
    assert all(e["n_stages"] == len(starts) for e in events if e["event"] != "log")
    tasks = {(e["stage"], e["task"].split(" (")[0], e["unit"]) for e in events if e["event"] == "progress"}
    assert {("phi_id", "phi_id", "epochs"), ("indep_id", "independent id", "epochs"),
            ("phi_class", "phi_class", "epochs"), ("inversion", "inversion", "batch-steps"),
            ("navigation", "navigation", "steps"), ("utility", "utility", "epochs")} <= tasks, tasks
    last = [e for e in events if e["event"] == "progress" and e["stage"] == "inversion"][-1]
    assert last["done"] == last["total"] > 0
    ends = [e for e in events if e["event"] == "end"]
    assert len(ends) == len(starts) and not any(e.get("failed") for e in ends)


@pytest.fixture()
def _identity():
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


def test_client_app_train_in_simulation_writes_the_sites_progress_file(tmp_path, _identity):
    from flwr.app import ArrayRecord, Context, Message, RecordDict

    from client.app import app
    from plan_shared.gan import GanTrainer
    from plan_shared.protocol import ConfigRef, TrainTask

    raw = tiny_config()
    raw["data"].update(source="medmnist", path=str(make_npz(tmp_path / "d.npz", n_train=40, size=8)), size=8)
    raw["partition"].update(sites=2)
    raw["site"] = {"state_dir": str(tmp_path / "out")}
    cfg = config_from_dict(raw)
    task = TrainTask(ArrayRecord(GanTrainer(cfg, 1, 8).weights("gd")), 3, 1, 8, 2, "x", ConfigRef.full(cfg))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config={})
    msg = Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7)
    reply = app(msg, ctx)
    assert not reply.has_error(), reply.error
    evs = P.ProgressTail(tmp_path / "out" / "sites", "*/progress.jsonl").poll()
    assert [(e["site"], e["stage"], e["event"]) for e in evs if e["event"] != "progress"] == [
        ("site-1", "GAN round 3", "start"), ("site-1", "GAN round 3", "end")]
    assert P.current() is None  # the handler's reporter is not left active
