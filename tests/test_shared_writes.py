"""Live intake's group commit (:class:`pipeline.intake.SharedWrites`): the bodies of requests
in flight share one statement and one commit, each request gets its own rows back, and a
body the inbox refuses fails alone -- counted at the database, against the real store."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing
from conftest import sql

from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.intake import LiveIntake, SharedWrites
from pipeline.store import InstanceRow, PhoneRule, Store
from stages.intake import Accepted
from stages.parse import InstanceDirectory
from stages.records import InboundMessage, RawEvent, Receipt, Stored

DIRECTORY = InstanceDirectory({"1122334455667": "demo"}, {})
AT = dt.datetime(2026, 11, 30, 10, tzinfo=dt.UTC)


def body(n: int, text: str | None = None, sender: int | None = None) -> RawEvent:
    """A Cloud API body with one text message ``wamid.<n>`` (the sender's number from
    ``sender``, ``n`` by default)."""
    wa_id = f"55119{sender if sender is not None else n:07d}"
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "1", "phone_number_id": "1122334455667"},
             "contacts": [{"profile": {"name": "A"}, "wa_id": wa_id}],
             "messages": [{"from": wa_id, "id": f"wamid.{n}",
                           "timestamp": str(int(AT.timestamp())), "type": "text",
                           "text": {"body": text if text is not None else f"oi {n}"}}]}
    return RawEvent(AT, "cloud-api", {"object": "whatsapp_business_account", "entry": [
        {"id": "1", "changes": [{"field": "messages", "value": value}]}]})


def receipt_body(n: int) -> RawEvent:
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "1", "phone_number_id": "1122334455667"},
             "statuses": [{"id": f"wamid.out{n}", "status": "delivered",
                           "timestamp": str(int(AT.timestamp())), "recipient_id": "5511900"}]}
    return RawEvent(AT, "cloud-api", {"object": "whatsapp_business_account", "entry": [
        {"id": "1", "changes": [{"field": "messages", "value": value}]}]})


@attrs.define
class Gated:
    """The real store's two writes, counted; the first inbox write waits for ``release`` (so
    that the next bodies queue behind it); ``refuse`` makes every write unavailable."""

    store: Store
    release: trio.Event = attrs.Factory(trio.Event)
    entered: trio.Event = attrs.Factory(trio.Event)
    inbound: list[int] = attrs.Factory(list)  # messages per statement
    receipts: list[int] = attrs.Factory(list)
    refuse: bool = False

    async def store_inbound(self, messages: Sequence[InboundMessage],
                            first_due: dt.timedelta = dt.timedelta(0), *,
                            stamp: bool = False) -> list[Stored]:
        self.inbound.append(len(messages))
        if len(self.inbound) == 1:
            self.entered.set()
            await self.release.wait()
        if self.refuse:
            raise DatabaseUnavailable("the inbox is down (on purpose)")
        return await self.store.store_inbound(messages, first_due, stamp=stamp)

    async def record_receipts(self, receipts: Sequence[Receipt], phone: PhoneRule = "off"
                              ) -> int:
        self.receipts.append(len(receipts))
        return await self.store.record_receipts(receipts, phone)


async def _accept_all(intake: LiveIntake, gate: Gated, events: list[RawEvent]
                      ) -> dict[int, Accepted | DatabaseError]:
    """Accept ``events[0]`` (held in its write), then the rest while it is held, at once."""
    results: dict[int, Accepted | DatabaseError] = {}

    async def one(i: int) -> None:
        try:
            results[i] = await intake.accept(events[i])
        except DatabaseError as exc:
            results[i] = exc

    assert intake.writes is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(intake.writes.run)
        async with trio.open_nursery() as requests:
            requests.start_soon(one, 0)
            await gate.entered.wait()
            for i in range(1, len(events)):
                requests.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            gate.release.set()
        intake.writes.close()
    return results


@pytest.fixture
async def gate(store: Store) -> Gated:
    await store.seed_instances([InstanceRow("demo", "1122334455667", "demo", {})])
    return Gated(store)


def _intake(store: Store, gate: Gated, writers: int = 1) -> LiveIntake:
    return LiveIntake(store, DIRECTORY, SharedWrites(gate, writers=writers))


async def test_bodies_arriving_during_a_write_share_the_next_statement(
        store: Store, gate: Gated, conninfo: str) -> None:
    intake = _intake(store, gate)
    events = [body(n) for n in range(10)] + [receipt_body(n) for n in range(3)]
    results = await _accept_all(intake, gate, events)
    assert gate.inbound == [1, 9]  # the held body alone, then everyone who came meanwhile
    assert gate.receipts == [3]
    for i in range(10):  # each request gets its own message back, new
        accepted = results[i]
        assert isinstance(accepted, Accepted)
        assert [(s.message.message_id, s.redelivered) for s in accepted.stored] == [
            (f"wamid.{i}", False)]
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(10,)]


async def test_a_redelivery_in_the_same_batch_is_a_duplicate_of_its_own_request(
        store: Store, gate: Gated, conninfo: str) -> None:
    intake = _intake(store, gate)
    events = [body(0), body(1), body(2), body(1), body(3)]
    results = await _accept_all(intake, gate, events)
    assert gate.inbound == [1, 4]
    flags = {i: [s.redelivered for s in r.stored] for i, r in results.items()
             if isinstance(r, Accepted)}
    # whichever of the two deliveries queued first is the new one (tasks start in any order)
    assert {k: v for k, v in flags.items() if k not in (1, 3)} == {
        0: [False], 2: [False], 4: [False]}
    assert sorted([flags[1], flags[3]]) == [[False], [True]]
    assert sql(conninfo, "SELECT count(*), sum(redeliveries) FROM inbox") == [(4, 1)]


async def test_a_body_the_inbox_refuses_fails_alone(store: Store, gate: Gated,
                                                    conninfo: str) -> None:
    """A NUL in a text (the webhook's checks would stop it; here it reaches the store): the
    batch is written body by body, and only that request gets the error."""
    intake = _intake(store, gate)
    events = [body(0), body(1), body(2, "oi\x00"), body(3), body(4)]
    results = await _accept_all(intake, gate, events)
    assert gate.inbound == [1, 4, 1, 1, 1, 1]
    assert isinstance(results[2], DatabaseError)
    assert not isinstance(results[2], DatabaseUnavailable)
    assert all(isinstance(results[i], Accepted) for i in (0, 1, 3, 4))
    assert sql(conninfo, "SELECT message->>'message_id' FROM inbox ORDER BY 1") == [
        ("wamid.0",), ("wamid.1",), ("wamid.3",), ("wamid.4",)]


async def test_an_unavailable_inbox_fails_every_body_of_the_batch(store: Store, gate: Gated,
                                                                  conninfo: str) -> None:
    """Each request of the batch answers 503 (the webhook maps DatabaseUnavailable); none
    is taken for stored."""
    intake = _intake(store, gate)
    gate.refuse = True
    results = await _accept_all(intake, gate, [body(n) for n in range(4)])
    assert all(isinstance(r, DatabaseUnavailable) for r in results.values())
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(0,)]


async def test_a_request_that_gives_up_does_not_stop_its_batch(store: Store, gate: Gated,
                                                              conninfo: str) -> None:
    """A client that disconnects while its body is queued: the batch is written for the
    others (its own row too -- as after a connection lost right after a commit)."""
    intake = _intake(store, gate)
    assert intake.writes is not None
    results: list[Accepted] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(intake.writes.run)

        async def one(event: RawEvent) -> None:
            results.append(await intake.accept(event))

        async with trio.open_nursery() as requests:
            requests.start_soon(one, body(0))
            await gate.entered.wait()
            with trio.CancelScope() as gone:
                async with trio.open_nursery() as doomed:
                    doomed.start_soon(one, body(1))
                    requests.start_soon(one, body(2))
                    await trio.testing.wait_all_tasks_blocked()
                    gone.cancel()
            gate.release.set()
        intake.writes.close()
    assert gate.inbound == [1, 2]
    assert sorted(s.message.message_id for r in results for s in r.stored) == [
        "wamid.0", "wamid.2"]
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(3,)]


async def test_closing_finishes_the_queued_bodies(store: Store, gate: Gated,
                                                  conninfo: str) -> None:
    """Shutdown: the server stops, then close() -- whatever is queued is written first."""
    gate.release.set()
    shared = SharedWrites(gate, writers=2)
    intake = LiveIntake(store, DIRECTORY, shared)
    done: list[Accepted] = []

    async def one(n: int) -> None:
        done.append(await intake.accept(body(n)))

    async with trio.open_nursery() as nursery:
        await nursery.start(shared.run)
        async with trio.open_nursery() as requests:
            for n in range(20):
                requests.start_soon(one, n)
        shared.close()
    assert len(done) == 20
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(20,)]
    assert sum(gate.inbound) == 20

