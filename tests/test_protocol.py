"""plan_shared/protocol.py: every record round-trips through a RecordDict; bad records are clear errors."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from plan_shared.config import config_from_dict
from plan_shared.encoder import Encoder, EncoderStats, encoder_payload
from plan_shared.protocol import (
    UNKNOWN_CONFIG_MARK,
    ClassifierScore,
    ConfigRef,
    DescribeReply,
    DescribeTask,
    EvaluationTask,
    FedRealReply,
    FedRealTask,
    ProtocolError,
    ReferenceEvaluation,
    ReferenceTask,
    SiteEvaluation,
    SynthesisSummary,
    SynthesisTask,
    TrainMetrics,
    TrainReply,
    TrainTask,
    UnknownConfigError,
    site_config,
)
from tests.test_federation_util import tiny_config


def _cfg(**fed):
    return config_from_dict(tiny_config(**fed))


def _arrays() -> ArrayRecord:
    return ArrayRecord({"g.w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "g_ema.b": torch.ones(3)})


def _same_arrays(a: ArrayRecord, b: ArrayRecord) -> bool:
    x, y = a.to_torch_state_dict(), b.to_torch_state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _score(cm) -> ClassifierScore:
    cm = np.asarray(cm, dtype=np.int64)
    return ClassifierScore(float(np.trace(cm) / cm.sum()), 0.5, None, int(cm.sum()), cm)


def _summary() -> SynthesisSummary:
    return SynthesisSummary(
        "site-0", "b" * 64, "stored", 40, 12, 10, 10, 0.5, 0.031, 3, 12.5,
        compare={"plan": {"accuracy": 0.8, "n": 12.0, "mia_auc": 0.51, "mia_auc_lo": 0.45, "mia_auc_hi": 0.57},
                 "real": {"accuracy": 0.9, "mia_auc": 1.0}},
        methods={"plan": {"n": 40.0, "mean_dcr": 3.2, "accept_rate": 0.3}},
        utility={"synthetic": 0.8, "real": 0.9},
        timing={"inversion": 1.5, "navigation": 2.0},
    )


def _evaluation() -> SiteEvaluation:
    return SiteEvaluation("site-1", 2, 3.25, _score([[5, 1], [2, 4]]), _score([[6, 0], [1, 5]]),
                          {"mia_auc": 0.52, "mia_auc_lo": float("nan"), "n_members": 100.0, "n_synthetic": 12.0})


def test_tasks_round_trip():
    ref = ConfigRef.full(_cfg())
    for task in (DescribeTask(ref), DescribeTask(ConfigRef.digest_only(_cfg()))):
        assert DescribeTask.from_record(task.to_record()) == task
    t = TrainTask(_arrays(), 3, 1, 8, 5, "run1", ConfigRef.digest_only(_cfg()))
    back = TrainTask.from_record(t.to_record())
    assert (back.server_round, back.channels, back.size, back.local_steps, back.run_digest, back.config) == \
        (3, 1, 8, 5, "run1", t.config) and _same_arrays(back.weights, t.weights)
    s = SynthesisTask(_arrays(), 1, 8, 7, "linear", ref)
    back_s = SynthesisTask.from_record(s.to_record())
    assert (back_s.channels, back_s.size, back_s.generator_round, back_s.method, back_s.config) == (1, 8, 7, "linear", ref)
    assert back_s.encoder is None and "encoder" not in s.to_record()  # a task without E: as before stop 24
    e = EvaluationTask(_arrays(), 4, 1, 8, ref)
    back_e = EvaluationTask.from_record(e.to_record())
    assert back_e.arch == {"num_classes": 4, "channels": 1, "size": 8} and _same_arrays(back_e.model, e.model)
    # message types: the Flower types the ClientApp registers its handlers under
    assert TrainTask.MESSAGE_TYPE == MessageType.TRAIN
    assert DescribeTask.MESSAGE_TYPE == f"{MessageType.QUERY}.{DescribeTask.ACTION}"


def test_replies_round_trip():
    d = DescribeReply("site-0", 3, 16, 120, 5)
    assert DescribeReply.from_record(d.to_record()) == d
    m = TrainMetrics(24, 0.7, 1.2, 0.01, 0.3, -0.2, 96, 4, 1.5, 2.0)
    r = TrainReply(_arrays(), m, "site-0")
    back = TrainReply.from_record(r.to_record())
    assert back.metrics == m and back.site_id == "site-0" and _same_arrays(back.weights, r.weights)
    # FedAvg weighs by this metric; metrics.jsonl shows these names
    assert r.to_record()["metrics"][TrainMetrics.WEIGHT_KEY] == 24 and m.as_dict()["images-seen"] == 96
    s = _summary()
    assert SynthesisSummary.from_record(s.to_record()) == s
    chosen = replace(s, method="random", method_reason="auto: the site's verdict supports random")  # autoexport
    assert SynthesisSummary.from_record(chosen.to_record()) == chosen
    older = s.to_record()  # a site that does not state its method: "" (not stated)
    del older["site"]["method"], older["site"]["method-reason"]
    assert SynthesisSummary.from_record(older).method == ""
    ev = _evaluation()
    back_ev = SiteEvaluation.from_record(ev.to_record())
    assert back_ev.synthetic == ev.synthetic and back_ev.real == ev.real and back_ev.site_id == "site-1"
    assert back_ev.synthetic.qwk is None and back_ev.evaluate_s == 3.25
    assert math.isnan(back_ev.privacy["mia_auc_lo"]) and back_ev.privacy["n_members"] == 100.0


def test_the_confusion_matrix_travels_as_an_array():
    rd = _evaluation().to_record()
    assert isinstance(rd["confusion"], ArrayRecord)
    cm = rd["confusion"]["synthetic"].numpy()
    assert cm.shape == (2, 2) and cm.dtype == np.int64 and cm.tolist() == [[5, 1], [2, 4]]
    # no flattened matrix anywhere in the scalar records
    for key in rd.metric_records:
        assert not any("confusion" in k for k in rd[key])


def test_missing_and_wrong_keys_name_the_message_and_the_key():
    rd = DescribeReply("site-0", 1, 8, 10, 2).to_record()
    del rd["site"]["num-train"]
    with pytest.raises(ProtocolError, match=r"DescribeReply: missing key 'num-train'"):
        DescribeReply.from_record(rd)
    rd = DescribeReply("site-0", 1, 8, 10, 2).to_record()
    rd["site"]["size"] = "8"
    with pytest.raises(ProtocolError, match=r"DescribeReply: key 'size' is '8' \(str\), expected int"):
        DescribeReply.from_record(rd)
    with pytest.raises(ProtocolError, match=r"TrainTask: the record has no 'round' section"):
        TrainTask.from_record(RecordDict({"arrays": _arrays()}))
    rd = TrainReply(_arrays(), TrainMetrics(1, 0, 0, 0, 0, 0, 1, 1, 0, 0), "s").to_record()
    rd["site"] = MetricRecord({"x": 1})
    with pytest.raises(ProtocolError, match=r"TrainReply: section 'site' is a MetricRecord, expected a ConfigRecord"):
        TrainReply.from_record(rd)
    rd = _summary().to_record()
    rd["tables"]["compare"] = '{"plan": {"accuracy": "high"}}'
    with pytest.raises(ProtocolError, match=r"SynthesisSummary: compare\['plan'\]\['accuracy'\] is 'high'"):
        SynthesisSummary.from_record(rd)
    rd = _evaluation().to_record()
    rd["confusion"] = ArrayRecord({"synthetic": rd["confusion"]["synthetic"]})
    with pytest.raises(ProtocolError, match=r"SiteEvaluation: the 'confusion' arrays lack 'real'"):
        SiteEvaluation.from_record(rd)
    rd = _evaluation().to_record()
    rd["summary"]["num_classes"] = 3
    with pytest.raises(ProtocolError, match=r"SiteEvaluation: confusion\['synthetic'\] is int64 \(2, 2\), expected"):
        SiteEvaluation.from_record(rd)
    with pytest.raises(ProtocolError, match=r"SynthesisTask: missing key 'config-digest'"):
        SynthesisTask.from_record(RecordDict({
            "generator": _arrays(), "plan": ConfigRecord({"plan-config": "{}"}),
            "synthesis": ConfigRecord({"channels": 1, "size": 8, "generator-round": 1, "method": "plan"})}))


def test_site_config_keeps_the_config_in_the_context_state():
    cfg = _cfg(rounds=4)
    state = RecordDict()
    with pytest.raises(UnknownConfigError, match=UNKNOWN_CONFIG_MARK):
        site_config(ConfigRef.digest_only(cfg), state)
    got = site_config(ConfigRef.full(cfg), state)
    assert got.digest() == cfg.digest() and got.federation.rounds == 4
    assert site_config(ConfigRef.digest_only(cfg), state) is got  # validated once
    # another node (another Context) that never got the config: refused, even in the same process
    with pytest.raises(UnknownConfigError):
        site_config(ConfigRef.digest_only(cfg), RecordDict())
    # a changed config replaces the old one
    new = _cfg(rounds=6)
    assert site_config(ConfigRef.full(new), state).federation.rounds == 6
    with pytest.raises(UnknownConfigError):
        site_config(ConfigRef.digest_only(cfg), state)
    with pytest.raises(ProtocolError, match="not JSON"):
        site_config(ConfigRef(new.digest(), "{not json"), RecordDict())


# fedreal: the downstream-reference records
def test_fedreal_records_round_trip():
    ref = ConfigRef.digest_only(_cfg())
    t = FedRealTask(_arrays(), "plain", 2, 2, 1, 28, ref)
    back = FedRealTask.from_record(t.to_record())
    assert (back.recipe, back.server_round, back.arch, back.config) == \
        ("plain", 2, {"num_classes": 2, "channels": 1, "size": 28}, ref) and _same_arrays(back.weights, t.weights)
    assert FedRealTask.MESSAGE_TYPE == f"{MessageType.QUERY}.fedreal"
    r = FedRealReply(_arrays(), 37, 1.25, "site-2")
    back_r = FedRealReply.from_record(r.to_record())
    assert (back_r.num_examples, back_r.train_s, back_r.site_id) == (37, 1.25, "site-2")
    assert r.to_record()["metrics"][FedRealReply.WEIGHT_KEY] == 37  # FedAvg's weight


def test_reference_records_round_trip_with_confusion_arrays():
    ref = ConfigRef.full(_cfg())
    models = {("phi_down", "pool"): _arrays(), ("plain", "federated_real"): _arrays(), ("plain", "central_real"): _arrays()}
    t = ReferenceTask(models, ("phi_down", "plain"), 2, 1, 8, ref)
    back = ReferenceTask.from_record(t.to_record())
    assert set(back.models) == set(models) and back.recipes == ("phi_down", "plain") and back.config == ref
    assert all(_same_arrays(back.models[k], v) for k, v in models.items())
    with pytest.raises(ProtocolError, match=r"model \('plain', 'site_alone'\) is not one of"):
        ReferenceTask({("plain", "site_alone"): _arrays()}, ("plain",), 2, 1, 8, ref).to_record()
    seeded = {("plain", "pool"): _arrays(), ("plain", "pool_s1"): _arrays(), ("plain", "pool_s12"): _arrays()}
    assert set(ReferenceTask.from_record(ReferenceTask(seeded, ("plain",), 2, 1, 8, ref).to_record()).models) == \
        set(seeded)
    for bad in ("pool_s0", "pool_s", "pool_sx", "pool_s01"):
        with pytest.raises(ProtocolError, match=f"model \\('plain', '{bad}'\\) is not one of"):
            ReferenceTask({("plain", bad): _arrays()}, ("plain",), 2, 1, 8, ref).to_record()

    scores = {("phi_down", "site_alone"): _score([[5, 1], [2, 4]]), ("plain", "federated_real"): _score([[3, 3], [0, 6]])}
    ev = ReferenceEvaluation("site-1", 2, 4.5, scores)
    rd = ev.to_record()
    assert rd["confusion"]["model-plain-federated_real"].numpy().tolist() == [[3, 3], [0, 6]]
    back_ev = ReferenceEvaluation.from_record(rd)
    assert back_ev.scores == scores and (back_ev.site_id, back_ev.num_classes, back_ev.evaluate_s) == ("site-1", 2, 4.5)
    seeded_scores = {("plain", "pool_s2"): _score([[4, 2], [1, 5]])}
    assert ReferenceEvaluation.from_record(ReferenceEvaluation("site-1", 2, 1.0, seeded_scores).to_record()).scores \
        == seeded_scores
    with pytest.raises(ProtocolError, match="unknown reference 'pool_seed'"):
        ReferenceEvaluation("site-1", 2, 1.0, {("plain", "pool_seed"): _score([[1, 0], [0, 1]])}).to_record()
    bad = ReferenceEvaluation("site-1", 3, 1.0, scores).to_record()
    with pytest.raises(ProtocolError, match=r"confusion\['model-phi_down-site_alone'\] is int64 \(2, 2\), expected"):
        ReferenceEvaluation.from_record(bad)


def test_pool_seed_reference_names_round_trip():
    from plan_shared.protocol import is_reference, pool_seed_index, pool_seed_reference

    assert [pool_seed_reference(i) for i in range(3)] == ["pool", "pool_s1", "pool_s2"]
    assert [pool_seed_index(pool_seed_reference(i)) for i in range(12)] == list(range(12))
    assert pool_seed_index("site_alone") is None and pool_seed_index("pool_s0") is None
    assert is_reference("pool_s3", sent=True) and not is_reference("site_alone", sent=True)
    assert is_reference("site_alone") and not is_reference("pool_x")
    with pytest.raises(ValueError, match="pool seed index must be >= 0, got -1"):
        pool_seed_reference(-1)


def test_synthesis_task_carries_the_coordinators_encoder():
    torch.manual_seed(0)
    E = Encoder(channels=1, size=8, w_dim=4, width=4, w_avg=torch.randn(4), sigma_w=0.7)
    E.stats = EncoderStats(3, 8, 48, 1.5, 0.25)
    p = encoder_payload(E, "a" * 64)
    ref = ConfigRef.full(_cfg())
    rd = SynthesisTask(_arrays(), 1, 8, 7, "plan", ref, p).to_record()
    back = SynthesisTask.from_record(rd).encoder
    assert back is not None and back.generator_sha256 == "a" * 64 and back.arch == p.arch and back.stats == E.stats
    assert set(back.state) == set(p.state) and all(torch.equal(back.state[k], p.state[k]) for k in p.state)
    del rd["encoder-meta"]
    with pytest.raises(ProtocolError, match="SynthesisTask: the record has no 'encoder-meta' section"):
        SynthesisTask.from_record(rd)
    rd["encoder-meta"] = ConfigRecord({k: v for k, v in p.meta().items() if k != "arch-size"})
    with pytest.raises(ProtocolError, match="SynthesisTask: section 'encoder-meta': missing or invalid key 'arch-size'"):
        SynthesisTask.from_record(rd)
