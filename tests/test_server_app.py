"""ServerApp pieces without Flower processes: run config, waiting for sites, resume guard."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from plan_shared.config import config_from_dict  # noqa: E402
from server.federation import (  # noqa: E402
    Federation,
    FederationError,
    load_run_config,
    run_digest,
    wait_for_nodes,
)
from tests.test_federation_util import tiny_config  # noqa: E402


class FakeGrid:
    def __init__(self, schedule):
        self.schedule, self.calls = schedule, 0

    def get_node_ids(self):
        ids = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        return ids


def test_wait_for_nodes_deadline_is_a_clear_error():
    with pytest.raises(FederationError, match=r"only 1 site\(s\) connected .* at least 2"):
        wait_for_nodes(FakeGrid([[11]]), want=3, need=2, deadline_s=0.3, poll_s=0.05)


def test_wait_for_nodes_settles_for_min_nodes_after_deadline():
    assert wait_for_nodes(FakeGrid([[1, 2]]), want=3, need=2, deadline_s=0.2, poll_s=0.05) == [1, 2]


def test_wait_for_nodes_returns_as_soon_as_all_expected_are_there():
    assert wait_for_nodes(FakeGrid([[1], [1, 2], [1, 2, 3]]), want=3, need=2, deadline_s=30, poll_s=0.01) == [1, 2, 3]


def test_run_config_from_context(tmp_path):
    raw = tiny_config(rounds=7)
    base = {"plan-config": json.dumps(raw), "out-dir": str(tmp_path)}
    cfg, out, expected = load_run_config(base)
    assert cfg.federation.rounds == 7 and out == tmp_path and expected == 0
    # num-server-rounds > 0 (`flwr run --run-config`) overrides the config
    cfg, _, expected = load_run_config({**base, "num-server-rounds": 3, "expected-nodes": 5})
    assert cfg.federation.rounds == 3 and expected == 5


def test_resume_refuses_a_different_model(tmp_path):
    a = config_from_dict(tiny_config())
    b = config_from_dict({**tiny_config(), "generator": {**tiny_config()["generator"], "w_dim": 16}})
    assert run_digest(a) != run_digest(b)
    # rounds, timeouts and min_nodes may change across a restart
    c = config_from_dict(tiny_config(rounds=9, min_nodes=1, round_timeout_s=5))
    assert run_digest(a) == run_digest(c)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"round": 1, "run_digest": run_digest(a)}))
    assert Federation(FakeGrid([[1]]), c, tmp_path).latest()["round"] == 1
    with pytest.raises(FederationError, match="different model"):
        Federation(FakeGrid([[1]]), b, tmp_path).latest()
