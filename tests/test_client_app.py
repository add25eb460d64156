"""The ClientApp called directly (no Ray, no SuperNode): describe and train handlers."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from plan_shared.config import config_from_dict  # noqa: E402
from tests.test_federation_util import make_npz, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


def _ctx(tmp_path, site="hospital-a", n=12):
    npz = make_npz(tmp_path / f"{site}.npz", n_train=n)
    nc = {"site-id": site, "data-source": "medmnist", "data-path": str(npz), "state-dir": str(tmp_path / site)}
    return Context(run_id=1, node_id=7, node_config=nc, state=RecordDict(), run_config={})


def _conf(cfg: dict, **extra) -> ConfigRecord:
    base = {"plan-config": json.dumps(config_from_dict(cfg).to_dict()), "run-digest": "x", "channels": 1, "size": 8,
            "local-steps": 2, "server-round": 1}
    base.update(extra)
    return ConfigRecord(base)


def _call(msg: Message, ctx: Context) -> Message:
    from client.app import app

    return app(msg, ctx)


def test_describe_reports_shape_and_count(tmp_path):
    msg = Message(RecordDict({"config": _conf(tiny_config())}), message_type=f"{MessageType.QUERY}.describe",
                  dst_node_id=7)
    rep = _call(msg, _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    site = rep.content["site"]
    assert (site["site-id"], site["channels"], site["size"], site["num-train"]) == ("hospital-a", 1, 8, 12)


@pytest.mark.parametrize("share", ["gd", "g"])
def test_train_returns_weights_metrics_and_keeps_local_state(tmp_path, share):
    from plan_shared.gan import GanTrainer

    cfg = tiny_config(share=share)
    glob = GanTrainer(config_from_dict(cfg), 1, 8)
    ctx = _ctx(tmp_path, n=12)
    msg = Message(RecordDict({"arrays": ArrayRecord(glob.weights(share)), "config": _conf(cfg)}),
                  message_type=MessageType.TRAIN, dst_node_id=7)
    rep = _call(msg, ctx)
    assert not rep.has_error(), rep.error
    arrays = rep.content["arrays"].to_torch_state_dict()
    assert any(k.startswith("d.") for k in arrays) == (share == "gd")
    assert any(k.startswith("g_ema.") for k in arrays)
    m = rep.content["metrics"]
    assert m["num-examples"] == 12 and m["steps"] == 2 and m["images-seen"] == 2 * 4
    assert all(k in m for k in ("loss_g", "loss_d", "train-s"))
    # weights moved away from the global ones
    g0 = glob.weights(share)
    assert any(not torch.equal(arrays[k], g0[k]) for k in arrays if k.startswith("g."))
    state = torch.load(tmp_path / "hospital-a" / "local_trainer.pt", weights_only=True)
    assert state["step"] == 2
    if share == "g":
        # the local D is what the next round starts from (the global record carries no d.*)
        rep2 = _call(Message(RecordDict({"arrays": ArrayRecord(glob.weights(share)), "config": _conf(cfg, **{"server-round": 2})}),
                             message_type=MessageType.TRAIN, dst_node_id=7), ctx)
        assert not rep2.has_error()
        state2 = torch.load(tmp_path / "hospital-a" / "local_trainer.pt", weights_only=True)
        assert state2["step"] == 4
        assert any(not torch.equal(state2["discriminator"][k], glob.D.state_dict()[k]) for k in state2["discriminator"])


def test_wrong_image_shape_fails_with_a_clear_message(tmp_path):
    # Flower turns the exception into an error reply; the coordinator logs it per site.
    cfg = tiny_config()
    msg = Message(RecordDict({"arrays": ArrayRecord({}), "config": _conf(cfg, size=16)}),
                  message_type=MessageType.TRAIN, dst_node_id=7)
    with pytest.raises(ValueError, match="local images are"):
        _call(msg, _ctx(tmp_path))


def test_train_reply_carries_the_watch_points(tmp_path):
    # D's logits on real and generated images and the R1 penalty, averaged over the local steps
    from plan_shared.gan import GanTrainer

    cfg = tiny_config()
    glob = GanTrainer(config_from_dict(cfg), 1, 8)
    msg = Message(RecordDict({"arrays": ArrayRecord(glob.weights("gd")), "config": _conf(cfg, **{"local-steps": 4})}),
                  message_type=MessageType.TRAIN, dst_node_id=7)
    rep = _call(msg, _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    m = rep.content["metrics"]
    for k in ("d_real", "d_fake", "r1", "loss_d", "loss_g"):
        assert k in m and math.isfinite(m[k]), k
    assert m["r1"] > 0  # computed at least once in 4 steps (lazy R1), averaged over those steps
