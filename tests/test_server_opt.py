"""Server optimiser on the averaged update (server/server_opt.py): FedAvg equivalence, momentum by hand, resume."""

from __future__ import annotations

import pytest
import torch

from plan_shared.config import FederationConfig, config_from_dict
from server.server_opt import ServerOptError, ServerOptimizer


def _state(a: float, b: float) -> dict[str, torch.Tensor]:
    return {"g.w": torch.tensor([a, b]), "g.buf": torch.tensor([a]), "g_ema.w": torch.tensor([a, b])}


def test_momentum_beta0_lr1_equals_fedavg():
    opt = ServerOptimizer(FederationConfig(server_opt="momentum", server_momentum=0.0, server_lr=1.0), ["g.w"])
    cur, avg = _state(0.3, -1.2), _state(0.7, 2.5)
    out = opt.step(cur, avg)
    for k in avg:
        assert torch.allclose(out[k], avg[k], atol=1e-7)


def test_none_is_the_average_bit_for_bit():
    opt = ServerOptimizer(FederationConfig(), ["g.w"])
    avg = _state(0.7, 2.5)
    assert all(torch.equal(v, avg[k]) for k, v in opt.step(_state(0.0, 0.0), avg).items())


def test_two_round_momentum_by_hand():
    opt = ServerOptimizer(FederationConfig(server_opt="momentum", server_momentum=0.5, server_lr=2.0), ["g.w"])
    # round 1: delta = 1 - 0 = 1; m = 1; global = 0 + 2*1 = 2
    out = opt.step(_state(0.0, 0.0), _state(1.0, 1.0))
    assert out["g.w"].tolist() == [2.0, 2.0]
    assert out["g.buf"].tolist() == [1.0] and out["g_ema.w"].tolist() == [1.0, 1.0]  # not optimised: the average
    # round 2: delta = 2.5 - 2 = 0.5; m = 0.5*1 + 0.5 = 1; global = 2 + 2*1 = 4
    out = opt.step(out, _state(2.5, 2.5))
    assert out["g.w"].tolist() == [4.0, 4.0]


def test_adam_moves_towards_the_average():
    opt = ServerOptimizer(FederationConfig(server_opt="adam", server_lr=0.1), ["g.w"])
    out = opt.step(_state(0.0, 0.0), _state(1.0, -1.0))
    assert out["g.w"][0] > 0 > out["g.w"][1]


def test_state_round_trip_gives_identical_next_steps(tmp_path):
    fed = FederationConfig(server_opt="momentum", server_momentum=0.9, server_lr=1.0)
    gen = torch.Generator().manual_seed(0)
    sites = [{"g.w": torch.randn(5, generator=gen)} for _ in range(4)]
    a = ServerOptimizer(fed, ["g.w"])
    cur = {"g.w": torch.zeros(5)}
    cur = a.step(cur, sites[0])
    cur = a.step(cur, sites[1])
    a.save(tmp_path / "opt.pt")
    b = ServerOptimizer(fed, ["g.w"])
    b.load(tmp_path / "opt.pt")
    ca, cb = dict(cur), dict(cur)
    for s in sites[2:]:
        ca, cb = a.step(ca, s), b.step(cb, s)
    assert torch.equal(ca["g.w"], cb["g.w"])
    with pytest.raises(ServerOptError, match="server_opt"):
        ServerOptimizer(FederationConfig(server_opt="adam"), ["g.w"]).load(tmp_path / "opt.pt")


@pytest.mark.parametrize(("key", "value"), [("server_opt", "sgd"), ("server_momentum", 1.0), ("server_lr", 0.0),
                                            ("server_adam_eps", 0.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(Exception, match=f"federation.{key}"):
        config_from_dict({"federation": {key: value}})


def test_coordinator_checkpoint_carries_the_momentum_state(tmp_path):
    from plan_shared.gan import GanTrainer
    from server.federation import Federation
    from tests.test_federation_util import tiny_config

    cfg = config_from_dict(tiny_config(server_opt="momentum", server_momentum=0.9))
    trainer = GanTrainer(cfg, 1, 8)
    fed = Federation(None, cfg, tmp_path)  # type: ignore[arg-type]  # no messages are sent here
    fed.server_opt = fed.make_server_opt(trainer)
    current = trainer.weights("gd")
    gen = torch.Generator().manual_seed(1)
    average = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in current.items()}
    trainer.set_weights(fed.server_opt.step(current, average))
    fed.save(trainer, 1)

    again = Federation(None, cfg, tmp_path)  # type: ignore[arg-type]
    meta = again.latest()
    assert meta is not None and meta["server_opt"] == "momentum"
    resumed = GanTrainer.from_checkpoint(tmp_path / "checkpoints" / meta["checkpoint"])
    opt = again.make_server_opt(resumed, meta)
    assert opt.m is not None and fed.server_opt.m is not None and torch.equal(opt.m, fed.server_opt.m)
    nxt = {k: v - 0.02 for k, v in trainer.weights("gd").items()}
    a, b = fed.server_opt.step(trainer.weights("gd"), nxt), opt.step(resumed.weights("gd"), nxt)
    assert all(torch.equal(a[k], b[k]) for k in a)
