"""Group commit of turns (:mod:`pipeline.commits`, ``Store.commit_claims``): turns that end
together are written in one statement with exactly the effects each would write alone, and a
turn that is not an ordinary first commit (lease taken over, commit repeated) gets the answer
it would get alone while the others of its batch are written -- counted in the tables."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing
from conftest import sql

from pipeline.commits import SharedCommits
from pipeline.config import parse_config
from pipeline.db import DatabaseError
from pipeline.engine import instance_rows
from pipeline.rules import burst_rules
from pipeline.store import ClaimConflict, ClaimRequest, Store
from stages.dispatch import Messages, effects, turn_commit
from stages.records import (
    Claim,
    ClaimCommit,
    Committed,
    Decision,
    InboundMessage,
    Reply,
    Turn,
    TurnContext,
)
from stages.turns import turn_id

BASE = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
LATER = BASE + dt.timedelta(seconds=60)
NEXT_DUE = dt.timedelta(seconds=1.5)
CFG = parse_config({"instances": [{"name": "demo", "phone_number_id": "1122334455667"}]},
                   "test")


def message(sender: str, n: int, seconds: float, text: str, name: str | None = None
            ) -> InboundMessage:
    at = BASE + dt.timedelta(seconds=seconds)
    return InboundMessage(instance="demo", message_id=f"{sender}.{n}", sender=sender,
                          kind="text", text=text, sent_at=at, received_at=at,
                          format="cloud-api", sender_name=name)


async def claim_all(store: Store, n: int) -> dict[str, tuple[Claim, Turn]]:
    """Claim up to ``n`` due conversations; each one's claim and its turn (of every row)."""
    batch = await store.claim(ClaimRequest("test", LATER, n, 30.0, burst_rules(CFG)))
    out = {}
    for claimed in batch.claims:
        messages = tuple(m for _, m in claimed.rows)
        claim = Claim(claimed.conversation_id, claimed.token, tuple(i for i, _ in claimed.rows))
        out[messages[0].sender] = (claim, Turn(turn_id(messages), "demo", messages[0].sender,
                                               messages, claim=claim))
    return out


def commit_of(turn: Turn, verdict: str = "reply", first: int | None = None) -> ClaimCommit:
    """The commit of ``turn`` decided ``verdict``; ``first``: only its first rows are
    claimed (the others stay pending, so the conversation is due again)."""
    assert turn.claim is not None
    if first is not None:
        claim = attrs.evolve(turn.claim, row_ids=turn.claim.row_ids[:first])
        turn = attrs.evolve(turn, messages=turn.messages[:first], claim=claim)
    turn = attrs.evolve(turn, context=TurnContext(turn.claim.conversation_id),
                        decision=Decision(verdict, "keyword: humano" if verdict == "escalate"
                                          else None),
                        reply=Reply(f"an answer to {turn.text}", 0.8, False, "test"))
    return turn_commit(turn, effects(turn, Messages("handed over", "out of hours"), False),
                       NEXT_DUE, LATER)


async def seed(store: Store, *messages: InboundMessage) -> None:
    await store.seed_instances(instance_rows(CFG))
    await store.store_inbound(list(messages), NEXT_DUE)


def written_by(conninfo: str, sender: str) -> tuple[object, ...]:
    """Everything a commit writes for one conversation, without ids and the wall clock; the
    sender's number and its turns' ids (hashes of the message ids) read ``S`` and ``T``."""
    conv = "(SELECT id FROM conversations WHERE sender = %(s)s)"
    turns = [t for (t,) in sql(conninfo, "SELECT DISTINCT turn_id FROM inbox"
                               " WHERE sender = %(s)s AND turn_id IS NOT NULL", {"s": sender})]

    def norm(value: object) -> object:
        if isinstance(value, str):
            for turn in turns:
                value = value.replace(turn, "T")
            return value.replace(sender, "S")
        return value

    def rows(query: str) -> list[tuple[object, ...]]:
        return [tuple(norm(v) for v in row)
                for row in sql(conninfo, query.replace("{conv}", conv), {"s": sender})]

    return (
        rows("SELECT pending, due_at, lease_owner, lease_until, attempts, last_error,"
             " sender_name, last_message_at FROM conversations WHERE id = {conv}"),
        rows("SELECT message_id, status, action, reason, turn_id FROM inbox"
             " WHERE sender = %(s)s ORDER BY id"),
        rows("SELECT message_id, role, kind, body, turn_id,"
             " CASE WHEN role = 'user' THEN sent_at END FROM messages"
             " WHERE conversation_id = {conv} ORDER BY id"),
        rows("SELECT turn_id, responder, prompt, reply, confidence, fallback"
             " FROM ai_interactions WHERE conversation_id = {conv}"),
        rows("SELECT reason, status, turn_id FROM escalations WHERE conversation_id = {conv}"),
        rows("SELECT idempotency_key, kind, target, payload::text, status FROM outbox"
             " WHERE conversation_id = {conv} ORDER BY id"),
    )


async def test_a_batch_writes_what_each_commit_writes_alone(store: Store, conninfo: str) -> None:
    """Three kinds of turn, each twice (senders ``a*`` committed in one statement, ``b*``
    one by one): a reply, an escalation, a turn that leaves a row pending (due again)."""
    msgs = []
    for group in ("a", "b"):
        msgs += [message(f"{group}1", 1, 0, "oi", "Ana"), message(f"{group}1", 2, 1, "tudo bem?"),
                 message(f"{group}2", 1, 2, "quero um humano"),
                 message(f"{group}3", 1, 3, "primeiro"), message(f"{group}3", 2, 50, "segundo")]
    await seed(store, *msgs)
    turns = await claim_all(store, 6)
    assert sorted(turns) == ["a1", "a2", "a3", "b1", "b2", "b3"]

    def commits(group: str) -> list[ClaimCommit]:
        return [commit_of(turns[f"{group}1"][1]),
                commit_of(turns[f"{group}2"][1], "escalate"),
                commit_of(turns[f"{group}3"][1], first=1)]

    batch = await store.commit_claims(commits("a"))
    alone = [await store.commit_claim(c) for c in commits("b")]
    assert [c.written for c in batch] == [c.written for c in alone] == [True] * 3
    assert [c.next_due for c in batch] == [c.next_due for c in alone]
    assert batch[2].next_due == BASE + dt.timedelta(seconds=50) + NEXT_DUE
    for n in (1, 2, 3):
        assert written_by(conninfo, f"a{n}") == written_by(conninfo, f"b{n}")
    assert written_by(conninfo, "a2")[4] == [("keyword: humano", "open", "T")]
    assert [r[1] for r in written_by(conninfo, "a1")[5]] == ["reply"]


@attrs.define
class Gated:
    """The real store's commits, counted; the first waits for ``release`` so that the
    next ones queue behind it and leave as one batch."""

    store: Store
    release: trio.Event = attrs.Factory(trio.Event)
    entered: trio.Event = attrs.Factory(trio.Event)
    single: int = 0
    batches: list[int] = attrs.Factory(list)

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        self.single += 1
        if self.single == 1:
            self.entered.set()
            await self.release.wait()
        return await self.store.commit_claim(commit)

    async def commit_claims(self, commits: Sequence[ClaimCommit]) -> list[Committed]:
        self.batches.append(len(commits))
        return await self.store.commit_claims(commits)


async def _commit_together(gate: Gated, first: ClaimCommit, rest: list[ClaimCommit]
                           ) -> list[Committed | DatabaseError]:
    """``first`` alone (held), then ``rest`` queued behind it: one batch."""
    shared = SharedCommits(gate, writers=1)
    results: list[Committed | DatabaseError | None] = [None] * len(rest)

    async def one(i: int) -> None:
        try:
            results[i] = await shared.commit_claim(rest[i])
        except DatabaseError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        async with trio.open_nursery() as turns:
            turns.start_soon(shared.commit_claim, first)
            await gate.entered.wait()
            for i in range(len(rest)):
                turns.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            gate.release.set()
        shared.close()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


async def test_turns_ending_together_share_one_statement(store: Store, conninfo: str) -> None:
    await seed(store, *(message(f"s{n}", 1, n, f"oi {n}") for n in range(6)))
    turns = await claim_all(store, 6)
    gate = Gated(store)
    results = await _commit_together(gate, commit_of(turns["s0"][1]),
                                     [commit_of(turns[f"s{n}"][1]) for n in range(1, 6)])
    assert gate.batches == [5] and gate.single == 1
    assert all(isinstance(r, Committed) and r.written for r in results)
    assert sql(conninfo, "SELECT count(*) FROM outbox WHERE kind = 'reply'") == [(6,)]
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'processed'") == [(6,)]


async def test_a_lease_taken_over_fails_alone_and_the_others_are_written(
        store: Store, conninfo: str) -> None:
    """The batch writes nothing (all or nothing), then each turn alone: the one whose lease
    another process took gets ClaimConflict and writes nothing; the others are written.
    Without the split every turn of the batch would fail and be redone."""
    await seed(store, *(message(f"s{n}", 1, n, f"oi {n}") for n in range(4)))
    turns = await claim_all(store, 4)
    stolen = turns["s2"][0].conversation_id
    sql(conninfo, "UPDATE conversations SET lease_token = lease_token + 1000 WHERE id = %s",
        (stolen,))
    gate = Gated(store)
    results = await _commit_together(gate, commit_of(turns["s0"][1]),
                                     [commit_of(turns[f"s{n}"][1]) for n in (1, 2, 3)])
    assert gate.batches == [3] and gate.single == 1 + 3
    assert isinstance(results[1], ClaimConflict) and "taken over" in str(results[1])
    assert all(isinstance(r, Committed) and r.written for r in (results[0], results[2]))
    assert sql(conninfo, "SELECT sender FROM inbox WHERE status = 'pending'") == [("s2",)]
    assert sql(conninfo, "SELECT count(*) FROM outbox WHERE kind = 'reply'") == [(3,)]
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions WHERE conversation_id = %s",
               (stolen,)) == [(0,)]


async def test_a_commit_repeated_in_a_batch_is_recognised(store: Store, conninfo: str) -> None:
    """A retry after a lost answer (its commit landed) queued with fresh turns: it reports
    "not written" as alone, the others are written once."""
    await seed(store, *(message(f"s{n}", 1, n, f"oi {n}") for n in range(4)))
    turns = await claim_all(store, 4)
    repeated = commit_of(turns["s1"][1])
    assert (await store.commit_claim(repeated)).written
    gate = Gated(store)
    results = await _commit_together(gate, commit_of(turns["s0"][1]),
                                     [repeated, commit_of(turns["s2"][1]),
                                      commit_of(turns["s3"][1])])
    assert gate.batches == [3]
    assert [r.written for r in results if isinstance(r, Committed)] == [False, True, True]
    assert sql(conninfo, "SELECT count(*) FROM outbox WHERE kind = 'reply'") == [(4,)]
    assert sql(conninfo, "SELECT count(*) FROM ai_interactions") == [(4,)]


@pytest.mark.parametrize("writers", [1, 3])
async def test_many_turns_at_once_are_each_written_once(store: Store, conninfo: str,
                                                        writers: int) -> None:
    """40 turns committed at once through the shared commits: every one written exactly
    once, in fewer statements than turns."""
    await seed(store, *(message(f"s{n:02}", 1, n, f"oi {n}") for n in range(40)))
    turns = await claim_all(store, 40)
    gate = Gated(store)
    gate.release.set()
    shared = SharedCommits(gate, writers=writers)
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        async with trio.open_nursery() as lanes:
            for _, turn in turns.values():
                lanes.start_soon(shared.commit_claim, commit_of(turn))
        shared.close()
    assert gate.single + len(gate.batches) < 40
    assert gate.single + sum(gate.batches) == 40
    assert sql(conninfo, "SELECT count(*), count(DISTINCT conversation_id) FROM outbox"
               " WHERE kind = 'reply'") == [(40, 40)]
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'") == [(0,)]


async def test_intake_and_a_batch_commit_never_deadlock(store: Store, conninfo: str) -> None:
    """The deadlock group commit first brought (seen in a replay: a 1 s stall and a sequence
    gap): a batch commit locking conversations in one order while intake, storing new
    messages of the same senders, locked them in another. Raced 20 times, 12 conversations
    each; every statement takes its conversations' locks in id order now."""
    senders = [f"d{n:02}" for n in range(12)]
    await seed(store, *(message(s, 0, 0, "oi") for s in senders))
    deadlocks = []
    for round_ in range(1, 21):
        batch = await store.claim(ClaimRequest("test", BASE + dt.timedelta(hours=round_),
                                               len(senders), 30.0, burst_rules(CFG)))
        commits = []
        for claimed in batch.claims:
            msgs = tuple(m for _, m in claimed.rows)
            claim = Claim(claimed.conversation_id, claimed.token,
                          tuple(i for i, _ in claimed.rows))
            commits.append(commit_of(Turn(turn_id(msgs), "demo", msgs[0].sender, msgs,
                                          claim=claim)))
        assert len(commits) == len(senders), round_
        arriving = [message(s, round_, 3600 * round_ + 1, "de novo") for s in reversed(senders)]

        async def race(call: object) -> None:
            try:
                await call  # type: ignore[misc]
            except DatabaseError as exc:
                deadlocks.append(str(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(race, store.commit_claims(commits))
            nursery.start_soon(race, store.store_inbound(arriving, NEXT_DUE))
        assert deadlocks == [], round_
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'") == [(12,)]
    assert sql(conninfo, "SELECT count(*) FROM outbox") == [(12 * 20,)]


async def test_a_turn_that_cannot_be_encoded_fails_alone(store: Store, conninfo: str) -> None:
    """Not a database error but a bug-shaped one (an outbox payload JSON cannot encode): the
    batch is split like for a refused row, the turn's caller gets the error -- as it would
    writing alone -- and the writer goes on (it does not take the pipeline down)."""
    await seed(store, *(message(f"s{n}", 1, n, f"oi {n}") for n in range(4)))
    turns = await claim_all(store, 4)
    broken = commit_of(turns["s2"][1])
    assert broken.effects is not None
    (key, kind, target, _), = broken.effects.outbox
    broken = attrs.evolve(broken, effects=attrs.evolve(
        broken.effects, outbox=((key, kind, target, {"text": {"not", "json"}}),)))
    gate = Gated(store)

    async def commit(c: ClaimCommit) -> Committed | Exception:
        try:
            return await shared.commit_claim(c)
        except Exception as exc:  # the error is the result here
            return exc

    shared = SharedCommits(gate, writers=1)
    results: dict[str, Committed | Exception] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        async with trio.open_nursery() as lanes:
            lanes.start_soon(shared.commit_claim, commit_of(turns["s0"][1]))
            await gate.entered.wait()
            for name, c in (("s1", commit_of(turns["s1"][1])), ("s2", broken),
                            ("s3", commit_of(turns["s3"][1]))):
                async def one(name: str = name, c: ClaimCommit = c) -> None:
                    results[name] = await commit(c)
                lanes.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            gate.release.set()
        shared.close()
    assert gate.batches == [3]
    assert isinstance(results["s2"], Exception) and not isinstance(results["s2"], Committed)
    assert all(isinstance(results[s], Committed) for s in ("s1", "s3"))
    assert sql(conninfo, "SELECT sender FROM inbox WHERE status = 'pending'") == [("s2",)]
