"""The coordinator's one way to talk to the sites: push a batch of tasks, poll for the replies.

:meth:`Messenger.exchange` sends one task per node (built per node, so that the run
configuration travels in full only to a node that does not hold it yet, see
plan_shared/protocol.py), polls the replies every ``federation.reply_poll_s`` seconds
(Flower's ``send_and_receive`` sleeps 3 s between polls) and stops by a
:class:`WaitPolicy`: every node answered, or the timeout, or, once a quorum of
successful replies is in, a straggler grace. Replies are decoded into their protocol
record; a reply that does not decode counts as that node's failure.

A poll the SuperLink answers with a server error (HTTP 5xx, e.g. its SQLite state
"database is locked" under load) or that does not reach it is retried at the next poll
until the exchange's deadline, instead of ending the run; anything else still raises.

Errors are filed under the node the task went to, found through the message id: the
error reply Flower sends for a dead node comes from the SuperLink (``src_node_id`` 0),
not from the site. A site that refuses a task because it holds no configuration for
the digest (it restarted) gets the task again, with the full configuration, once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import httpx
from flwr.app import Message, RecordDict

from plan_shared.config import PlanConfig
from plan_shared.protocol import UNKNOWN_CONFIG_MARK, ConfigRef, ProtocolError

LOG = logging.getLogger("plan.messaging")


class GridLike(Protocol):
    """What the engine needs of a Flower ``Grid``."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...

    def get_node_ids(self) -> Iterable[int]: ...


def transient_poll_error(err: BaseException) -> bool:
    """A failed pull worth trying again: the SuperLink's 5xx answers and transport errors (not 4xx)."""
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code >= 500
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


class Task(Protocol):
    MESSAGE_TYPE: ClassVar[str]

    def to_record(self) -> RecordDict: ...


R = TypeVar("R")


@dataclass(frozen=True)
class WaitPolicy:
    """When an exchange stops waiting.

    At ``timeout_s``; or earlier, once ``quorum`` successful replies are in and the others
    have had ``max(grace x elapsed, min_wait_s)`` more seconds (``grace=None``: wait for
    everyone until ``timeout_s``). Error replies count as answers, not towards the quorum.
    """

    timeout_s: float
    quorum: int = 0
    grace: float | None = None
    min_wait_s: float = 0.0


@dataclass
class Exchange(Generic[R]):
    """What came back from one batch: decoded replies and failures, both by destination node."""

    sent: list[int]
    replies: dict[int, R] = field(default_factory=dict)
    messages: dict[int, Message] = field(default_factory=dict)  # the raw successful replies (FedAvg reads these)
    errors: dict[int, str] = field(default_factory=dict)  # error replies and undecodable replies
    ended: str = "all"  # all, grace or timeout
    elapsed_s: float = 0.0

    def missing(self) -> list[int]:
        """Nodes without a successful reply (errors and silence), in the order they were sent to."""
        return [n for n in self.sent if n not in self.replies]

    def ordered_messages(self, key: Callable[[R], str]) -> list[Message]:
        """The raw successful replies ordered by ``key`` of their decoded reply (the site id), then node id.

        Not in arrival order: a weighted mean in floating point depends on the order of its terms, so the
        same site updates arriving in another order would give a (slightly) different global model.
        """
        return [self.messages[n] for n in sorted(self.messages, key=lambda n: (key(self.replies[n]), n))]

    def reason(self, node_id: int, silent: str) -> str:
        """Why ``node_id`` has no reply: its error, else ``silent``."""
        return self.errors.get(node_id, silent)


class Messenger:
    """Sends tasks to the sites of one run and remembers which node holds which configuration."""

    def __init__(self, grid: GridLike, cfg: PlanConfig, poll_s: float | None = None):
        self.grid, self.cfg = grid, cfg
        self.poll_s = cfg.federation.reply_poll_s if poll_s is None else poll_s
        self._digest = cfg.digest()
        self._holds: dict[int, str] = {}  # node id -> digest of the config it acknowledged

    def config_for(self, node_id: int) -> ConfigRef:
        """The full configuration for a node that has not acknowledged it, else its digest."""
        if self._holds.get(node_id) == self._digest:
            return ConfigRef.digest_only(self.cfg)
        return ConfigRef.full(self.cfg)

    def exchange(self, node_ids: list[int], make: Callable[[int, ConfigRef], Task], decode: Callable[[RecordDict], R],
                 policy: WaitPolicy) -> Exchange[R]:
        """Send ``make(node, config_ref)`` to every node; collect the replies under ``policy``, ``decode`` each."""
        t0 = time.monotonic()
        out: Exchange[R] = Exchange(sent=list(node_ids))
        dst: dict[str, int] = {}  # message id -> destination node
        resent: set[int] = set()

        def push(nodes: list[int]) -> None:
            msgs = []
            for nid in nodes:
                task = make(nid, self.config_for(nid))
                msgs.append(Message(task.to_record(), message_type=task.MESSAGE_TYPE, dst_node_id=nid))
            for mid, nid in zip(self.grid.push_messages(msgs), nodes):
                if mid:
                    dst[mid] = nid

        push(list(node_ids))
        pending = set(dst)
        end = t0 + policy.timeout_s
        quorum_at: float | None = None
        out.ended = "all"
        failed_polls = 0
        while pending:
            again: list[int] = []
            try:
                pulled = list(self.grid.pull_messages(list(pending)))
            except Exception as err:  # deploytrace: a SuperLink hiccup costs a poll, not the run
                if not transient_poll_error(err) or time.monotonic() >= end:
                    raise
                failed_polls += 1
                if failed_polls == 1 or failed_polls % 20 == 0:
                    LOG.warning("polling the replies failed (%d so far), trying again: %s: %s", failed_polls,
                                type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                pulled = []
            for r in pulled:
                mid = r.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                nid = dst.get(mid, r.metadata.src_node_id)
                if self._file(out, nid, r, decode, retry=nid not in resent):
                    resent.add(nid)
                    again.append(nid)
            if again:
                before = set(dst)
                push(again)
                pending.update(set(dst) - before)
            if not pending:
                break
            now = time.monotonic()
            if quorum_at is None and policy.grace is not None and len(out.replies) >= policy.quorum:
                quorum_at = now
                end = min(end, now + max(policy.grace * (now - t0), policy.min_wait_s))
                LOG.info("%d site(s) replied after %.1fs; waiting at most %.0fs for %d more", len(out.replies),
                         now - t0, end - now, len(pending))
            if now >= end:
                out.ended = "grace" if quorum_at is not None and end < t0 + policy.timeout_s else "timeout"
                break
            time.sleep(min(self.poll_s, max(end - now, 0.0)))
        out.elapsed_s = time.monotonic() - t0
        return out

    def _file(self, out: Exchange[R], nid: int, r: Message, decode: Callable[[RecordDict], R], retry: bool) -> bool:
        """File reply ``r`` under node ``nid``; True when the task must go again with the full configuration."""
        if r.has_error():
            why = str(r.error.reason)
            if UNKNOWN_CONFIG_MARK in why and retry:
                LOG.info("node %d holds no run configuration (restarted?): sending it again", nid)
                self._holds.pop(nid, None)
                return True
            out.errors[nid] = why
            return False
        try:
            out.replies[nid] = decode(r.content)
        except ProtocolError as err:
            out.errors[nid] = f"the site's reply does not decode: {err}"
            return False
        out.messages[nid] = r
        out.errors.pop(nid, None)
        self._holds[nid] = self._digest
        return False
