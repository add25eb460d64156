"""ServerApp pieces without Flower processes: run config, waiting for sites, resume guard."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from plan_shared.config import config_from_dict  # noqa: E402
from server.federation import (  # noqa: E402
    Federation, FederationError, collect_replies, load_run_config, run_digest, wait_for_nodes,
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


class ReplyGrid:
    """Pushes get ids m0, m1, ...; message i is answered ``delays[i]`` s after the push (None: never)."""

    def __init__(self, delays, errors=()):
        self.delays, self.errors, self.t0 = delays, set(errors), None

    def push_messages(self, msgs):
        self.t0 = time.monotonic()
        for i, m in enumerate(msgs):
            m.metadata.message_id = f"m{i}"
        return [f"m{i}" for i in range(len(msgs))]

    def pull_messages(self, ids):
        now = time.monotonic() - self.t0
        out = []
        for mid in ids:
            i = int(mid[1:])
            if self.delays[i] is not None and now >= self.delays[i]:
                err = i in self.errors
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=1 if err else i),
                                           has_error=lambda err=err: err))
        return out


def _msgs(n):
    return [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=100 + i)) for i in range(n)]


def test_collect_replies_returns_when_everyone_answered():
    t0 = time.monotonic()
    replies, ended = collect_replies(ReplyGrid([0.0, 0.05, 0.1]), _msgs(3), min_replies=2, timeout_s=30, grace=2.0,
                                     poll_s=0.01)
    assert ended == "all" and len(replies) == 3 and time.monotonic() - t0 < 5


def test_collect_replies_cuts_a_straggler_after_the_grace():
    t0 = time.monotonic()
    replies, ended = collect_replies(ReplyGrid([0.1, 0.1, None]), _msgs(3), min_replies=2, timeout_s=30, grace=1.0,
                                     min_wait_s=0.3, poll_s=0.01)
    took = time.monotonic() - t0
    assert ended == "grace" and sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.35 <= took < 5, took  # quorum at ~0.1 s, then max(1.0 x 0.1, 0.3) s more


def test_collect_replies_waits_for_a_slower_site_within_the_grace():
    replies, ended = collect_replies(ReplyGrid([0.1, 0.1, 0.25]), _msgs(3), min_replies=2, timeout_s=30, grace=2.0,
                                     min_wait_s=0.0, poll_s=0.01)
    assert ended == "all" and len(replies) == 3


def test_collect_replies_without_grace_waits_until_the_round_timeout():
    t0 = time.monotonic()
    replies, ended = collect_replies(ReplyGrid([0.0, 0.0, None]), _msgs(3), min_replies=2, timeout_s=0.5, grace=None,
                                     poll_s=0.01)
    assert ended == "timeout" and len(replies) == 2 and time.monotonic() - t0 >= 0.5


def test_error_replies_end_the_wait_but_do_not_make_a_quorum():
    # Flower answers for a node that stopped sending heartbeats with an error reply from the SuperLink.
    t0 = time.monotonic()
    replies, ended = collect_replies(ReplyGrid([0.0, 0.05, 0.05], errors={1, 2}), _msgs(3), min_replies=2,
                                     timeout_s=30, grace=0.0, poll_s=0.01)
    assert ended == "all" and sum(r.has_error() for r in replies) == 2 and time.monotonic() - t0 < 5
    # Two error replies and no success: no quorum, so no grace cut; the round runs to its timeout.
    replies, ended = collect_replies(ReplyGrid([None, 0.0, 0.0], errors={1, 2}), _msgs(3), min_replies=2,
                                     timeout_s=0.3, grace=0.0, poll_s=0.01)
    assert ended == "timeout" and len(replies) == 2
