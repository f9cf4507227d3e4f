"""The database owns the work (issue 11, scenarios 1, 2, 3 and 5): the whole pipeline on the
real database and the virtual clock, fed like a live process, counting effects where they
land (outbox, AI interactions, inbox rows) -- and the store's fenced commit on its own.

Each scenario races the dangerous interleaving on purpose: a redelivery while the turn is
in flight and after its commit, a turn failing and then being redelivered, one conversation
whose answers take 30 s while others write, a commit whose claim was lost.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest import sql

from pipeline.claims import WorkClock
from pipeline.config import Config, parse_config
from pipeline.db import DatabaseError
from pipeline.engine import Inlets, Pipeline
from pipeline.rules import burst_rules
from pipeline.store import ClaimConflict, ClaimRequest, Store
from pipeline.vclock import VirtualClock
from stages.dispatch import Commits, Messages, effects, turn_commit
from stages.outcomes import OutcomeSink
from stages.records import (
    Claim,
    ClaimCommit,
    Committed,
    Decision,
    InboundMessage,
    Outcome,
    RawEvent,
    Reply,
    Turn,
    TurnContext,
)
from stages.turns import turn_id

FIXTURES = Path(__file__).parent / "fixtures" / "cloud-api"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
BASE = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
PHONE_ID = "1122334455667"


@pytest.fixture
def virtual_clock() -> VirtualClock:
    return VirtualClock()


def config(**pipeline: Any) -> Config:
    return parse_config({
        "pipeline": {"max_active_conversations": 8, "channel_capacity": 4, **pipeline},
        "instances": [{"name": "demo", "phone_number_id": PHONE_ID}],
    }, "test")


def cloud(fixture: str, sender: str, message_id: str, text: str | None = None) -> dict[str, Any]:
    body = json.loads((FIXTURES / fixture).read_text())
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = PHONE_ID
    message = value["messages"][0]
    message["from"], message["id"] = sender, message_id
    value["contacts"][0]["wa_id"] = sender
    if text is not None:
        message["text"]["body"] = text
    return body  # type: ignore[no-any-return]


@attrs.define
class Gate:
    """A responder whose answers for one sender wait until the test opens them."""

    sender: str
    opened: trio.Event = attrs.Factory(trio.Event)
    called: trio.Event = attrs.Factory(trio.Event)
    calls: list[str] = attrs.Factory(list)

    async def answer(self, turn: Turn, history: str) -> Reply:
        self.calls.append(turn.sender)
        if turn.sender == self.sender:
            self.called.set()
            await self.opened.wait()
        return Reply(f"answer to {turn.text}", 0.9, False, "gate")


@attrs.define
class Live:
    """A pipeline running like ``pipeline run`` (polling, no end of input), on the virtual
    clock; the test posts bodies and waits for outcomes."""

    pipeline: Pipeline
    send: trio.MemorySendChannel[RawEvent]
    t0: float
    outcomes: list[Outcome]

    def now(self) -> dt.datetime:
        return BASE + dt.timedelta(seconds=trio.current_time() - self.t0)

    async def post(self, body: dict[str, Any]) -> None:
        await self.send.send(RawEvent(self.now(), "cloud-api", body))

    async def outcome(self, message_id: str, n: int = 1) -> list[Outcome]:
        """Wait until ``message_id`` has ``n`` outcomes (at most a virtual minute)."""
        with trio.fail_after(60):
            while len(got := [o for o in self.outcomes if o.message_id == message_id]) < n:  # noqa: ASYNC110
                await trio.sleep(0.05)
        return got


@asynccontextmanager
async def live(store: Store, cfg: Config, responder: Any,
               commits: Commits | None = None) -> AsyncIterator[Live]:
    t0 = trio.current_time()

    def now() -> dt.datetime:
        return BASE + dt.timedelta(seconds=trio.current_time() - t0)

    def at(when: dt.datetime) -> float:
        return t0 + (when - BASE).total_seconds()

    seen: list[Outcome] = []
    sink = OutcomeSink(observers=[lambda o, _: seen.append(o)])
    pipeline = Pipeline(cfg, store, sink, clock=WorkClock(now, at), poll_s=0.2, finite=False,
                        responders={"demo": responder}, commits=commits)
    send, recv = trio.open_memory_channel[RawEvent](16)

    async def source(inlets: Inlets) -> None:
        async with recv:
            async for event in recv:
                await inlets.raw.send(event)

    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, source)
        try:
            yield Live(pipeline, send, t0, seen)
        finally:
            await send.aclose()
            pipeline.stop_sources()


def effects_of(conninfo: str) -> tuple[object, ...]:
    return sql(conninfo, "SELECT (SELECT count(*) FROM outbox WHERE kind = 'reply'),"
               " (SELECT count(*) FROM ai_interactions),"
               " (SELECT count(*) FROM messages WHERE role = 'assistant')")[0]


# --- 1. a redelivery during and after its turn -----------------------------------------------


@pytest.mark.parametrize("fixture", ["07_voice_note.json", "01_text.json"])
async def test_a_redelivery_during_and_after_its_turn_is_answered_once(
    virtual_clock: VirtualClock, store: Store, conninfo: str, fixture: str,
) -> None:
    """Issue 11.1: a redelivery stored while the turn is in flight (the row still pending)
    and one after the turn committed. A voice note has no text for the repeated-text rule to
    catch; the id alone must. One reply, one AI interaction; the redeliveries are
    duplicates."""
    gate = Gate("5511988887777")
    async with live(store, config(), gate) as run:
        body = cloud(fixture, gate.sender, "wamid.twice")
        await run.post(body)
        await gate.called.wait()  # the turn is in flight
        await run.post(body)
        [during] = await run.outcome("wamid.twice")
        gate.opened.set()
        await run.outcome("wamid.twice", 2)
        await trio.sleep(40)  # as Meta does, much later
        await run.post(body)
        got = await run.outcome("wamid.twice", 3)
    assert during.action == "duplicate"
    assert sorted(o.action for o in got) == ["duplicate", "duplicate", "replied"]
    assert effects_of(conninfo) == (1, 1, 1)
    assert gate.calls == [gate.sender]
    assert sql(conninfo, "SELECT redeliveries, action FROM inbox") == [(2, "replied")]


# --- 3. a failed turn, then a redelivery -------------------------------------------------------


class FailingOnce:
    """Commits (:class:`stages.dispatch.Commits`) through the real store, but the first
    commit of a turn fails."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.failures = 0

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        if commit.effects is not None and not self.failures:
            self.failures += 1
            raise DatabaseError("commit failed on purpose")
        return await self.store.commit_claim(commit)


async def test_a_failed_turn_and_its_redelivered_text_are_answered_not_closed_as_a_repeat(
    virtual_clock: VirtualClock, store: Store, conninfo: str,
) -> None:
    """Issue 11.3: the turn fails; Meta redelivers the message within the repeated-text
    window. The redelivery is a duplicate of its id, and the message itself is redone and
    answered -- never closed as a repeat of its own earlier copy."""
    failing = FailingOnce(store)
    gate = Gate("nobody")
    gate.opened.set()
    async with live(store, config(), gate, failing) as run:
        body = cloud("01_text.json", "5511977776666", "wamid.retry", "what is the price?")
        await run.post(body)
        with trio.fail_after(30):
            while not failing.failures:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await run.post(body)
        got = await run.outcome("wamid.retry", 2)
    assert failing.failures == 1
    assert sorted(o.action for o in got) == ["duplicate", "replied"]
    assert effects_of(conninfo) == (1, 1, 1)
    assert sql(conninfo, "SELECT action, reason FROM inbox") == [("replied", None)]
    assert sql(conninfo, "SELECT attempts, last_error, lease_owner FROM conversations") == [
        (0, None, None)]


# --- 5. one slow conversation does not stall the others ------------------------------------


async def test_a_conversation_whose_answers_take_30_s_does_not_delay_the_others(
    virtual_clock: VirtualClock, store: Store,
) -> None:
    """Issue 11.5, the same simulation as scripts/sim_head_of_line.py (smaller): one user
    writes every 2 s to a responder taking 30 s, 20 others every 10 s (0.5 s answers), with
    8 conversations at a time and channels of 4. Every other user is answered a burst window
    plus 0.5 s after writing -- in the first minute and in the last; before, that grew to
    ~108 s within a minute."""
    from sim_head_of_line import Plan, simulate

    result = await simulate(store, Plan(minutes=2, others=20))
    expected = 1.5 + 0.5
    waits = [w for ws in result.waits.values() for w in ws]
    assert result.other_outcomes == result.other_messages == len(waits)
    assert max(waits) == pytest.approx(expected, abs=0.01)
    assert sum(result.slow.values()) == 60  # the slow user's backlog all done, in the end


# --- 2. the fenced commit -------------------------------------------------------------------


def message(sender: str, message_id: str, seconds: float, text: str) -> InboundMessage:
    at = BASE + dt.timedelta(seconds=seconds)
    return InboundMessage(instance="demo", message_id=message_id, sender=sender, kind="text",
                          text=text, sent_at=at, received_at=at, format="cloud-api")


async def _claim_one(store: Store, now: dt.datetime, owner: str = "test") -> tuple[Claim, Turn]:
    rules = burst_rules(config())
    batch = await store.claim(ClaimRequest(owner, now, 1, 30.0, rules))
    [claimed] = batch.claims
    messages = tuple(m for _, m in claimed.rows)
    claim = Claim(claimed.conversation_id, claimed.token, tuple(i for i, _ in claimed.rows))
    turn = Turn(turn_id(messages), "demo", messages[0].sender, messages, claim=claim)
    return claim, turn


def _commit(turn: Turn, now: dt.datetime) -> ClaimCommit:
    assert turn.claim is not None
    turn = attrs.evolve(turn, context=TurnContext(turn.claim.conversation_id),
                        decision=Decision("reply", None),
                        reply=Reply("an answer", 0.9, False, "test"))
    fx = effects(turn, Messages("handed over", "out of hours"), True)
    return turn_commit(turn, fx, dt.timedelta(seconds=1.5), now)


async def _seed(store: Store, conninfo: str, *messages: InboundMessage) -> None:
    from pipeline.engine import instance_rows

    await store.seed_instances(instance_rows(config()))
    await store.store_inbound(list(messages), dt.timedelta(seconds=1.5))


async def test_a_commit_after_its_lease_was_taken_over_writes_nothing(
    store: Store, conninfo: str,
) -> None:
    await _seed(store, conninfo, message("a", "m1", 0, "hello"))
    later = BASE + dt.timedelta(seconds=60)
    first, turn = await _claim_one(store, later)
    sql(conninfo, "UPDATE conversations SET lease_until = now() - interval '1 s'")  # expired
    second, _ = await _claim_one(store, later, owner="other")
    assert second.token > first.token
    with pytest.raises(ClaimConflict, match="taken over"):
        await store.commit_claim(_commit(turn, later))
    assert effects_of(conninfo) == (0, 0, 0)
    assert sql(conninfo, "SELECT status FROM inbox") == [("pending",)]


async def test_a_claim_says_when_it_took_an_expired_lease(store: Store, conninfo: str) -> None:
    """The lease expiries of /metrics: a claim tells a fresh conversation from one whose
    lease had run out."""
    await _seed(store, conninfo, message("a", "m1", 0, "hello"))
    later = BASE + dt.timedelta(seconds=60)
    rules = burst_rules(config())
    [fresh] = (await store.claim(ClaimRequest("test", later, 1, 30.0, rules))).claims
    sql(conninfo, "UPDATE conversations SET lease_until = now() - interval '1 s'")
    [taken] = (await store.claim(ClaimRequest("other", later, 1, 30.0, rules))).claims
    assert (fresh.expired, taken.expired) == (False, True)


async def test_a_turn_whose_rows_were_answered_meanwhile_fails_loudly(
    store: Store, conninfo: str,
) -> None:
    """Issue 11.2: a second turn over an already answered message must not report a reply
    that was never written."""
    await _seed(store, conninfo, message("a", "m1", 0, "hello"))
    later = BASE + dt.timedelta(seconds=60)
    _, turn = await _claim_one(store, later)
    sql(conninfo, "UPDATE inbox SET status = 'processed', action = 'replied', turn_id = 'x'")
    with pytest.raises(ClaimConflict, match="already processed"):
        await store.commit_claim(_commit(turn, later))
    assert effects_of(conninfo) == (0, 0, 0)


async def test_a_turn_whose_reply_key_is_used_by_other_content_fails_loudly(
    store: Store, conninfo: str,
) -> None:
    await _seed(store, conninfo, message("a", "m1", 0, "hello"))
    later = BASE + dt.timedelta(seconds=60)
    claim, turn = await _claim_one(store, later)
    sql(conninfo, "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target,"
        " payload) VALUES (%s, 'reply', 'demo', %s, 'a', '{}')",
        (f"{turn.turn_id}:reply", claim.conversation_id))
    with pytest.raises(ClaimConflict, match="idempotency key"):
        await store.commit_claim(_commit(turn, later))
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions") == [(0,)]
    assert sql(conninfo, "SELECT status FROM inbox") == [("pending",)]


async def test_a_commit_repeated_after_a_lost_answer_is_recognised(
    store: Store, conninfo: str,
) -> None:
    await _seed(store, conninfo, message("a", "m1", 0, "hello"))
    later = BASE + dt.timedelta(seconds=60)
    _, turn = await _claim_one(store, later)
    commit = _commit(turn, later)
    assert (await store.commit_claim(commit)).written
    again = await store.commit_claim(commit)
    assert not again.written
    assert effects_of(conninfo) == (1, 1, 1)
    assert sql(conninfo, "SELECT pending, lease_owner FROM conversations") == [(0, None)]


# --- the guard between intake and a commit ------------------------------------------------------


async def test_a_message_stored_while_its_conversation_commits_is_never_forgotten(
    store: Store, conninfo: str,
) -> None:
    """Intake counts new rows into ``conversations.pending`` and the commit recomputes
    ``due_at`` from what it can see. Raced 40 times: a new message of the conversation is
    stored at the same moment as the commit of its previous turn. Whatever the order, the
    new row ends up due (never pending with nothing due, which no claimer would find)."""
    rules = burst_rules(config())
    for n in range(40):
        sender = f"race{n}"
        await _seed(store, conninfo, message(sender, f"{sender}.1", 0, "first"))
        later = BASE + dt.timedelta(seconds=60)
        batch = await store.claim(ClaimRequest("t", later, 1, 30.0, rules))
        [claimed] = batch.claims
        messages = tuple(m for _, m in claimed.rows)
        claim = Claim(claimed.conversation_id, claimed.token, (claimed.rows[0][0],))
        turn = Turn(turn_id(messages), "demo", sender, messages, claim=claim)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.commit_claim, _commit(turn, later))
            nursery.start_soon(store.store_inbound,
                               [message(sender, f"{sender}.2", 61, "second")],
                               dt.timedelta(seconds=1.5))
        state = sql(conninfo, "SELECT c.pending, c.due_at IS NOT NULL FROM conversations c"
                    " WHERE c.sender = %s", (sender,))
        pending = sql(conninfo, "SELECT count(*) FROM inbox WHERE sender = %s"
                      " AND status = 'pending'", (sender,))
        assert state == [(1, True)] and pending == [(1,)], n
        # and a claim does find it
        found = await store.claim(ClaimRequest("t", BASE + dt.timedelta(seconds=120), 8, 30.0,
                                               rules))
        assert [len(c.rows) for c in found.claims] == [1], n
        await store.release_all([(c.conversation_id, c.token) for c in found.claims])
        sql(conninfo, "UPDATE inbox SET status = 'processed', action = 'ignored' WHERE sender = %s",
            (sender,))
        sql(conninfo, "UPDATE conversations SET pending = 0, due_at = NULL WHERE sender = %s",
            (sender,))



def test_only_dead_processes_of_this_host_are_taken_over() -> None:
    import os
    import subprocess

    from pipeline.claims import dead_local_owners

    gone = subprocess.Popen(["true"])
    gone.wait()
    owners = [f"here:{gone.pid}", f"here:{os.getpid()}", "here:1", f"there:{gone.pid}",
              "here:notapid", "here"]
    assert dead_local_owners(owners, "here") == [f"here:{gone.pid}"]


async def test_a_start_takes_over_the_leases_of_a_dead_process_of_its_host(
    store: Store, conninfo: str,
) -> None:
    """A process restarted after a crash does not wait ``lease_s`` for its predecessor's
    leases: their owner (same host, pid gone) is dead, so the new claimer gives them back at
    start -- and leaves a living process's and another host's alone."""
    import socket
    import subprocess

    from pipeline.claims import Claimer

    gone = subprocess.Popen(["true"])  # noqa: ASYNC220 -- a pid that has just ended
    gone.wait()
    host = socket.gethostname()
    await _seed(store, conninfo, message("a", "a1", 0, "hi"), message("b", "b1", 0, "hi"),
                message("c", "c1", 0, "hi"))
    owners = {"a": f"{host}:{gone.pid}", "b": f"{host}:1", "c": f"elsewhere:{gone.pid}"}
    for sender, owner in owners.items():
        sql(conninfo, "UPDATE conversations SET lease_owner = %s, lease_token = 1,"
            " lease_until = now() + interval '1 hour' WHERE sender = %s", (owner, sender))
    send, _ = trio.open_memory_channel[Turn](1)
    done, _ = trio.open_memory_channel[Outcome](1)
    claimer = Claimer(store, burst_rules(config()), send, done, WorkClock(lambda: BASE,
                      lambda t: 0.0), 8, 30.0, 1.0, trio.Event())
    await claimer._take_over_dead_local()
    assert sql(conninfo, "SELECT sender, lease_owner FROM conversations ORDER BY sender") == [
        ("a", None), ("b", owners["b"]), ("c", owners["c"])]
