"""plan_shared/packing.py: weights as one flat array, FedAvg over it, and the layout checks."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.gan import GanTrainer
from plan_shared.packing import PREFIX, PackingError, is_packed, pack_weights, unpack_weights
from tests.test_federation_util import tiny_config


def _trainer(seed: int, cfg: PlanConfig | None = None) -> GanTrainer:
    torch.manual_seed(seed)
    return GanTrainer(cfg or config_from_dict(tiny_config()), 1, 8, torch.device("cpu"))


def test_round_trip_is_exact_and_one_array() -> None:
    w = _trainer(0).weights("gd")
    rec = pack_weights(w)
    assert is_packed(rec) and len(rec) == 1 and next(iter(rec.keys())).startswith(PREFIX)
    back = unpack_weights(rec, w)
    assert list(back) == list(w)
    for k in w:
        assert back[k].shape == w[k].shape and torch.equal(back[k], w[k]), k
    t = _trainer(1)  # another initialisation takes the packed weights exactly
    t.set_weights(back)
    assert all(torch.equal(v, w[k]) for k, v in t.weights("gd").items())


def test_unpacked_record_passes_through() -> None:
    w = _trainer(0).weights("g")
    rec = ArrayRecord(w)
    assert not is_packed(rec)
    back = unpack_weights(rec, w)
    assert all(torch.equal(back[k], w[k]) for k in w)


def test_fedavg_over_packed_equals_per_tensor_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):  # a Message needs the process's task identity
        monkeypatch.setattr(TaskIdentity, k, v)
    ws = [_trainer(s).weights("gd") for s in range(3)]
    n = [10, 30, 60]

    strategy = FedAvg(weighted_by_key="num-examples")
    packed, _ = strategy.aggregate_train(1, [_as_reply(pack_weights(w), k) for w, k in zip(ws, n)])
    plain, _ = strategy.aggregate_train(1, [_as_reply(ArrayRecord(w), k) for w, k in zip(ws, n)])
    assert packed is not None and plain is not None
    got = unpack_weights(packed, ws[0])
    ref = plain.to_torch_state_dict()
    for key in ws[0]:
        expect = sum(w[key] * k for w, k in zip(ws, n)) / sum(n)
        torch.testing.assert_close(got[key], ref[key])
        torch.testing.assert_close(got[key], expect)


def _as_reply(rec: ArrayRecord, num_examples: int) -> Message:
    """A reply message as FedAvg receives it from a site."""
    task = Message(RecordDict({"cfg": ConfigRecord({"x": 1})}), dst_node_id=7, message_type="train")
    task.metadata.__dict__["_message_id"] = task.object_id
    return Message(RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": num_examples})}),
                   reply_to=task)


def test_other_model_is_refused_by_name() -> None:
    w = _trainer(0).weights("gd")
    raw = tiny_config()
    raw["generator"] = {**raw["generator"], "w_dim": 2 * raw["generator"]["w_dim"]}
    other = config_from_dict(raw)
    like = _trainer(0, other).weights("gd")
    with pytest.raises(PackingError, match="layout .* coordinator and site build different networks"):
        unpack_weights(pack_weights(w), like)
    with pytest.raises(PackingError, match="layout"):
        unpack_weights(pack_weights(w), _trainer(0).weights("g"))  # share g vs gd


def test_non_float_and_empty_refused() -> None:
    with pytest.raises(PackingError, match="float32"):
        pack_weights({"a": torch.zeros(3), "steps": torch.zeros(1, dtype=torch.int64)})
    with pytest.raises(PackingError, match="no weights"):
        pack_weights({})
