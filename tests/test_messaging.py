"""server/messaging.py against a small in-process Grid (push/pull/get_node_ids) that answers like Flower's.

The replies are real Flower Messages built the way the SuperLink delivers them; an
error for a dead node comes from the SuperLink (src_node_id 0), not from the site.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Error, Message, Metadata
from flwr.app.message.message import make_message
from flwr.supercore.task_identity import TaskIdentity

from plan_shared.config import config_from_dict
from plan_shared.gan import GanTrainer
from plan_shared.protocol import (
    UNKNOWN_CONFIG_MARK,
    ClassifierScore,
    DescribeReply,
    DescribeTask,
    EvaluationTask,
    SiteEvaluation,
    SynthesisSummary,
    SynthesisTask,
)
from server.federation import FederationResult
from server.messaging import Messenger, WaitPolicy
from server.post_training import Phases
from server.report import SiteFailure, synthesis_json
from tests.test_federation_util import tiny_config

SUPERLINK = 0


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK, 1
    yield


class Grid:
    """A Grid whose nodes answer by script: ``answer(node, task message) -> (delay_s or None, RecordDict or Error)``.

    A reply is delivered once, by ``pull_messages``, after its delay; an ``Error`` comes from the
    SuperLink (src_node_id 0), as Flower's error replies for unreachable nodes do.
    """

    def __init__(self, answer, nodes=(11, 12, 13)):
        self.answer, self.nodes = answer, list(nodes)
        self.pushed: list[Message] = []
        self.due: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            m.metadata.__dict__["_message_id"] = mid  # the Grid assigns ids on push
            self.pushed.append(m)
            delay, out = self.answer(m.metadata.dst_node_id, m)
            if delay is not None:
                src = SUPERLINK if isinstance(out, Error) else m.metadata.dst_node_id
                md = Metadata(run_id=1, message_id=f"r{mid}", src_node_id=src, dst_node_id=SUPERLINK,
                              reply_to_message_id=mid, group_id="", created_at=time.time(), ttl=60.0,
                              message_type=m.metadata.message_type)
                reply = make_message(md, error=out) if isinstance(out, Error) else make_message(md, content=out)
                self.due[mid] = (time.monotonic() + delay, reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        now, out = time.monotonic(), []
        for mid in message_ids:
            if mid in self.due and self.due[mid][0] <= now:
                out.append(self.due.pop(mid)[1])
        return out


CFG = config_from_dict(tiny_config())


def _describe(delays, errors=()):
    def answer(nid, msg):
        d = delays[nid]
        if nid in errors:
            return d, Error(code=0, reason=f"node {nid} stopped sending heartbeats")
        return d, DescribeReply(f"site-{nid}", 1, 8, 10, 2).to_record()
    return answer


def _ask(grid, policy, poll_s=0.01):
    return Messenger(grid, CFG, poll_s=poll_s).exchange(grid.nodes, lambda nid, ref: DescribeTask(ref),
                                                        DescribeReply.from_record, policy)


def test_every_node_answered():
    ex = _ask(Grid(_describe({11: 0.0, 12: 0.05, 13: 0.1})), WaitPolicy(30, quorum=2, grace=2.0))
    assert ex.ended == "all" and ex.missing() == [] and ex.errors == {}
    assert {n: r.site_id for n, r in ex.replies.items()} == {11: "site-11", 12: "site-12", 13: "site-13"}
    assert all(ex.messages[n].metadata.src_node_id == n for n in ex.replies)


def test_replies_are_aggregated_in_site_order_whatever_order_they_arrive_in():
    # a float weighted mean depends on the order of its terms: the same updates must give the same global model
    names = {11: "site-2", 12: "site-0", 13: "site-1"}

    def run(delays):
        def answer(nid, msg):
            return delays[nid], DescribeReply(names[nid], 1, 8, 10, 2).to_record()
        return _ask(Grid(answer), WaitPolicy(30))

    first, second = run({11: 0.10, 12: 0.20, 13: 0.0}), run({11: 0.0, 12: 0.10, 13: 0.20})
    assert list(first.messages) == [13, 11, 12] and list(second.messages) == [11, 12, 13]  # arrival order differs
    for ex in (first, second):
        ordered = ex.ordered_messages(lambda r: r.site_id)
        assert [m.metadata.src_node_id for m in ordered] == [12, 13, 11]  # site-0, site-1, site-2
        assert all(ordered[i] is ex.messages[n] for i, n in enumerate((12, 13, 11)))


def test_replies_are_polled_at_the_configured_interval_not_flowers_3s():
    grid = Grid(_describe({11: 0.3, 12: 0.3, 13: 0.3}))
    assert CFG.federation.reply_poll_s == 0.2
    t0 = time.monotonic()
    ex = Messenger(grid, CFG).exchange(grid.nodes, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record,
                                       WaitPolicy(30))
    assert ex.ended == "all" and len(ex.replies) == 3
    assert 2 <= grid.pulls <= 4 and time.monotonic() - t0 < 2.5  # a pull at 0, 0.2, 0.4 s


def test_a_straggler_is_cut_after_the_grace():
    t0 = time.monotonic()
    ex = _ask(Grid(_describe({11: 0.1, 12: 0.1, 13: None})), WaitPolicy(30, quorum=2, grace=1.0, min_wait_s=0.3))
    assert ex.ended == "grace" and sorted(ex.replies) == [11, 12] and ex.missing() == [13]
    assert ex.reason(13, "late") == "late"
    assert 0.35 <= time.monotonic() - t0 < 5  # quorum at ~0.1 s, then max(1.0 x 0.1, 0.3) s more


def test_a_slower_site_within_the_grace_is_waited_for():
    ex = _ask(Grid(_describe({11: 0.1, 12: 0.1, 13: 0.25})), WaitPolicy(30, quorum=2, grace=2.0))
    assert ex.ended == "all" and len(ex.replies) == 3


def test_without_grace_the_wait_runs_to_the_timeout():
    t0 = time.monotonic()
    ex = _ask(Grid(_describe({11: 0.0, 12: 0.0, 13: None})), WaitPolicy(0.5, quorum=2, grace=None))
    assert ex.ended == "timeout" and len(ex.replies) == 2 and time.monotonic() - t0 >= 0.5


def test_error_replies_end_the_wait_but_make_no_quorum():
    ex = _ask(Grid(_describe({11: 0.0, 12: 0.05, 13: 0.05}, errors={12, 13})), WaitPolicy(30, quorum=2, grace=0.0))
    assert ex.ended == "all" and sorted(ex.errors) == [12, 13] and list(ex.replies) == [11]
    ex = _ask(Grid(_describe({11: None, 12: 0.0, 13: 0.0}, errors={12, 13})), WaitPolicy(0.3, quorum=2, grace=0.0))
    assert ex.ended == "timeout" and ex.replies == {} and sorted(ex.errors) == [12, 13]


def test_an_error_from_the_superlink_is_filed_under_the_destination_node():
    ex = _ask(Grid(_describe({11: 0.0, 12: 0.0, 13: 0.0}, errors={13})), WaitPolicy(30))
    assert ex.errors == {13: "node 13 stopped sending heartbeats"} and SUPERLINK not in ex.errors
    assert ex.missing() == [13]


def test_a_reply_that_does_not_decode_is_that_nodes_failure():
    def answer(nid, msg):
        rd = DescribeReply(f"site-{nid}", 1, 8, 10, 2).to_record()
        if nid == 12:
            del rd["site"]["num-classes"]
        return 0.0, rd
    ex = _ask(Grid(answer), WaitPolicy(30))
    assert sorted(ex.replies) == [11, 13] and "DescribeReply: missing key 'num-classes'" in ex.errors[12]


def test_the_config_travels_in_full_once_then_as_its_digest():
    sent: list[tuple[int, bool]] = []

    def answer(nid, msg):
        full = DescribeTask.from_record(msg.content).config.config_json is not None
        sent.append((nid, full))
        return (0.0, Error(code=0, reason="boom")) if nid == 13 else (0.0, DescribeReply("s", 1, 8, 1, 2).to_record())

    grid = Grid(answer)
    m = Messenger(grid, CFG, poll_s=0.01)
    for _ in range(2):
        m.exchange(grid.nodes, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record, WaitPolicy(30))
    # 11 and 12 acknowledged the full config; 13 failed, so it gets the full config again
    assert sent == [(11, True), (12, True), (13, True), (11, False), (12, False), (13, True)]
    assert all(DescribeTask.from_record(p.content).config.digest == CFG.digest() for p in grid.pushed)


def test_a_site_without_the_config_gets_the_task_again_with_it():
    asked: list[tuple[int, bool]] = []

    def answer(nid, msg):
        full = DescribeTask.from_record(msg.content).config.config_json is not None
        asked.append((nid, full))
        if nid == 12 and not full:  # restarted: lost its Context state
            return 0.0, Error(code=0, reason=f"ClientApp raised: {UNKNOWN_CONFIG_MARK} abc: restarted")
        return 0.0, DescribeReply(f"site-{nid}", 1, 8, 1, 2).to_record()

    grid = Grid(answer, nodes=(11, 12))
    m = Messenger(grid, CFG, poll_s=0.01)
    m.exchange(grid.nodes, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record, WaitPolicy(30))
    ex = m.exchange(grid.nodes, lambda nid, ref: DescribeTask(ref), DescribeReply.from_record, WaitPolicy(30))
    assert asked[2:] == [(11, False), (12, False), (12, True)]
    assert sorted(ex.replies) == [11, 12] and ex.errors == {}


def _score():
    cm = np.array([[3, 1], [0, 4]], dtype=np.int64)
    return ClassifierScore(0.875, 0.875, 0.7, 8, cm)


def test_the_post_training_phases_file_a_dead_sites_error_under_its_own_name(tmp_path):
    """The wrong-node bug: phase a/c errors come from the SuperLink (node 0); they belong to the site sent to."""
    dead = 12

    def answer(nid, msg):
        if nid == dead:
            return 0.0, Error(code=0, reason="Message: node 12 is offline")
        if msg.metadata.message_type == SynthesisTask.MESSAGE_TYPE:
            task = SynthesisTask.from_record(msg.content)
            assert task.generator_round == 2 and all(k.startswith("g_ema.") for k in task.generator)
            return 0.0, SynthesisSummary(f"site-{nid}", "b" * 8, "stored", 10, 4, 2, 2, 0.5, 0.1, 2, 1.0).to_record()
        assert msg.metadata.message_type == EvaluationTask.MESSAGE_TYPE
        return 0.0, SiteEvaluation(f"site-{nid}", 2, 0.5, _score(), _score(), {"mia_auc": 0.5}).to_record()

    grid = Grid(answer)
    cfg = config_from_dict(tiny_config(round_timeout_s=30))
    trainer = GanTrainer(cfg, 1, 8)
    names = {11: "site-11", 12: "site-12", 13: "site-13"}
    result = FederationResult(cfg, tmp_path, trainer, 1, 8, grid.nodes, dict(names), {"rounds_done": 2},
                              Messenger(grid, cfg, poll_s=0.01))
    ph = Phases(result)
    syn = ph.synthesize(grid.nodes, "plan")
    assert sorted(syn.ok()) == ["site-11", "site-13"]
    failed = syn.sites["site-12"]
    assert isinstance(failed, SiteFailure) and failed.node_id == dead and failed.reason == "node 12 is offline"
    assert "node-0" not in syn.sites and synthesis_json(syn)["sites"]["site-12"]["status"] == "failed"
    phi = torch.nn.Linear(2, 2)
    ev = ph.evaluate(grid.nodes, phi, {"num_classes": 2, "channels": 1, "size": 8})
    assert sorted(ev.ok()) == ["site-11", "site-13"] and isinstance(ev.sites["site-12"], SiteFailure)
    assert set(ev.sites) == set(names.values())
    task = EvaluationTask.from_record(grid.pushed[-1].content)
    assert set(task.model.to_torch_state_dict()) == {"weight", "bias"} and task.arch["num_classes"] == 2
    # the synthesis already delivered the config to 11 and 13: the evaluation carries only its digest
    ev_tasks = [EvaluationTask.from_record(p.content) for p in grid.pushed[3:]]
    assert [t.config.config_json is None for t in ev_tasks] == [True, False, True]


class FlakyGrid(Grid):
    """The SuperLink answers the first ``fail`` polls with HTTP ``status`` (its SQLite 'database is locked')."""

    def __init__(self, answer, fail: int, status: int = 500):
        super().__init__(answer)
        self.fail, self.status = fail, status

    def pull_messages(self, message_ids):
        import httpx

        if self.fail > 0:
            self.fail -= 1
            self.pulls += 1
            req = httpx.Request("POST", "https://127.0.0.1:9093/v1/runtime/pull-messages")
            raise httpx.HTTPStatusError("Server error", request=req, response=httpx.Response(self.status, request=req))
        return super().pull_messages(message_ids)


def test_a_failed_poll_is_retried_not_fatal(caplog):
    grid = FlakyGrid(_describe({11: 0.0, 12: 0.0, 13: 0.0}), fail=3)
    with caplog.at_level("WARNING", logger="plan.messaging"):
        ex = _ask(grid, WaitPolicy(30))
    assert ex.ended == "all" and ex.missing() == [] and len(ex.replies) == 3
    assert grid.pulls >= 4 and "polling the replies failed (1 so far)" in caplog.text


def test_a_refused_poll_still_raises():
    import httpx

    with pytest.raises(httpx.HTTPStatusError):  # 4xx: retrying cannot help (auth, unknown run)
        _ask(FlakyGrid(_describe({11: 0.0, 12: 0.0, 13: 0.0}), fail=1, status=403), WaitPolicy(30))
