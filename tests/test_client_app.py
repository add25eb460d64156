"""The ClientApp called directly (no Ray, no SuperNode): describe and train handlers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Context, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from plan_shared.config import config_from_dict  # noqa: E402
from plan_shared.protocol import (  # noqa: E402
    UNKNOWN_CONFIG_MARK,
    ConfigRef,
    DescribeReply,
    DescribeTask,
    ProtocolError,
    TrainReply,
    TrainTask,
    UnknownConfigError,
)
from tests.test_federation_util import make_npz, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield


def _ctx(tmp_path, site="hospital-a", n=12):
    npz = make_npz(tmp_path / f"{site}.npz", n_train=n)
    nc = {"site-id": site, "data-source": "medmnist", "data-path": str(npz), "state-dir": str(tmp_path / site)}
    return Context(run_id=1, node_id=7, node_config=nc, state=RecordDict(), run_config={})


def _ref(cfg: dict) -> ConfigRef:
    return ConfigRef.full(config_from_dict(cfg))


def _train(cfg: dict, weights: dict, server_round: int = 1, size: int = 8, local_steps: int = 2,
           ref: ConfigRef | None = None) -> Message:
    task = TrainTask(ArrayRecord(weights), server_round, 1, size, local_steps, "x", ref or _ref(cfg))
    return Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7)


def _call(msg: Message, ctx: Context) -> Message:
    from client.app import app

    return app(msg, ctx)


def test_describe_reports_shape_and_count(tmp_path):
    task = DescribeTask(_ref(tiny_config()))
    rep = _call(Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7), _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    assert DescribeReply.from_record(rep.content) == DescribeReply("hospital-a", 1, 8, 12, 2)


@pytest.mark.parametrize("share", ["gd", "g"])
def test_train_returns_weights_metrics_and_keeps_local_state(tmp_path, share):
    from plan_shared.gan import GanTrainer

    cfg = tiny_config(share=share)
    glob = GanTrainer(config_from_dict(cfg), 1, 8)
    ctx = _ctx(tmp_path, n=12)
    rep = _call(_train(cfg, glob.weights(share)), ctx)
    assert not rep.has_error(), rep.error
    reply = TrainReply.from_record(rep.content)
    arrays = reply.weights.to_torch_state_dict()
    assert any(k.startswith("d.") for k in arrays) == (share == "gd")
    assert any(k.startswith("g_ema.") for k in arrays)
    m = reply.metrics
    assert reply.site_id == "hospital-a"
    assert m.num_examples == 12 and m.steps == 2 and m.images_seen == 2 * 4 and m.train_s > 0
    # weights moved away from the global ones
    g0 = glob.weights(share)
    assert any(not torch.equal(arrays[k], g0[k]) for k in arrays if k.startswith("g."))
    state = torch.load(tmp_path / "hospital-a" / "local_trainer.pt", weights_only=True)
    assert state["step"] == 2
    if share == "g":
        # the local D is what the next round starts from (the global record carries no d.*)
        # the second task carries only the config's digest: the site kept the config in its Context state
        rep2 = _call(_train(cfg, glob.weights(share), server_round=2, ref=ConfigRef.digest_only(config_from_dict(cfg))),
                     ctx)
        assert not rep2.has_error()
        state2 = torch.load(tmp_path / "hospital-a" / "local_trainer.pt", weights_only=True)
        assert state2["step"] == 4
        assert any(not torch.equal(state2["discriminator"][k], glob.D.state_dict()[k]) for k in state2["discriminator"])


def test_packed_weights_in_packed_weights_out(tmp_path):
    """The coordinator's one-array form (plan_shared/packing.py): the site trains from it and answers in it."""
    from plan_shared.gan import GanTrainer
    from plan_shared.packing import is_packed, pack_weights, unpack_weights

    cfg = tiny_config()
    glob = GanTrainer(config_from_dict(cfg), 1, 8)
    g0 = glob.weights("gd")
    task = TrainTask(pack_weights(g0), 1, 1, 8, 2, "x", _ref(cfg))
    rep = _call(Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7), _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    reply = TrainReply.from_record(rep.content)
    assert is_packed(reply.weights) and len(reply.weights) == 1
    arrays = unpack_weights(reply.weights, g0)
    assert list(arrays) == list(g0)
    assert any(not torch.equal(arrays[k], g0[k]) for k in arrays if k.startswith("g."))


def test_wrong_image_shape_fails_with_a_clear_message(tmp_path):
    # Flower turns the exception into an error reply; the coordinator logs it per site.
    cfg = tiny_config()
    with pytest.raises(ValueError, match="local images are"):
        _call(_train(cfg, {}, size=16), _ctx(tmp_path))


def test_a_digest_the_site_has_no_config_for_is_a_clear_error(tmp_path):
    cfg = tiny_config(rounds=5)  # a config no other test sent: not in this process's cache either
    ref = ConfigRef.digest_only(config_from_dict(cfg))
    with pytest.raises(UnknownConfigError, match=f"{UNKNOWN_CONFIG_MARK} {ref.digest[:16]}.*restarted"):
        _call(_train(cfg, {}, ref=ref), _ctx(tmp_path))


def test_a_config_that_does_not_match_its_digest_is_refused(tmp_path):
    cfg = tiny_config()
    bad = ConfigRef(config_from_dict(tiny_config(rounds=3)).digest(), _ref(cfg).config_json)
    with pytest.raises(ProtocolError, match="digest"):
        _call(_train(cfg, {}, ref=bad), _ctx(tmp_path))


def test_train_reply_carries_the_watch_points(tmp_path):
    # D's logits on real and generated images and the R1 penalty, averaged over the local steps
    from plan_shared.gan import GanTrainer

    cfg = tiny_config()
    glob = GanTrainer(config_from_dict(cfg), 1, 8)
    rep = _call(_train(cfg, glob.weights("gd"), local_steps=4), _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    m = TrainReply.from_record(rep.content).metrics
    for k in ("d_real", "d_fake", "r1", "loss_d", "loss_g"):
        assert math.isfinite(getattr(m, k)), k
    assert m.r1 > 0  # computed at least once in 4 steps (lazy R1), averaged over those steps
    assert m.fd is not None and math.isfinite(m.fd) and m.fd > 0  # gan.watch_fd_samples: on by default
    assert m.fd_s is not None and 0 < m.fd_s < m.handler_s
    off = {**cfg, "gan": {**cfg.get("gan", {}), "watch_fd_samples": 0}}
    rep = _call(_train(off, glob.weights("gd"), local_steps=1), _ctx(tmp_path / "off", n=12))
    assert not rep.has_error(), rep.error
    assert TrainReply.from_record(rep.content).metrics.fd is None and "fd" not in rep.content["metrics"]


def test_evaluate_returns_scores_confusion_arrays_and_the_audit(tmp_path):
    # phases c+d at the site: phi_down's weights in, a SiteEvaluation out (no synthesis ran: nothing exported)
    from plan_shared.classifiers import build_classifier
    from plan_shared.protocol import EvaluationTask, SiteEvaluation

    cfg = tiny_config()
    cfg["downstream"] = {"epochs": 1, "width": 4, "depth": 1, "feature_dim": 8}
    phi = build_classifier(2, 1, 8, config_from_dict(cfg).downstream)
    task = EvaluationTask(ArrayRecord(phi.state_dict()), 2, 1, 8, _ref(cfg))
    rep = _call(Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=7), _ctx(tmp_path, n=12))
    assert not rep.has_error(), rep.error
    ev = SiteEvaluation.from_record(rep.content)
    assert ev.site_id == "hospital-a" and ev.num_classes == 2
    for sc in (ev.synthetic, ev.real):
        assert sc.confusion.shape == (2, 2) and int(sc.confusion.sum()) == sc.n == 4  # the site's test split
        assert sc.accuracy == pytest.approx(np.trace(sc.confusion) / sc.n)
    assert ev.privacy["n_members"] == 12 and ev.privacy["n_synthetic"] == 0
