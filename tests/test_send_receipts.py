"""Receipts and sends in doubt: status webhooks update the outbox row they belong to (never
downgraded), and a send whose outcome is unknown is reconciled with the channel's echo
before it is sent again -- against a real PostgreSQL and a local fake channel."""

from __future__ import annotations

from typing import Any

import test_delivery
from conftest import sql
from test_delivery import Receiver, Reply, add_row, conversation, delivering, make_config
from test_faults import until

from pipeline.outbox import OutboxStore
from pipeline.store import Store
from stages.records import Receipt

receiver = test_delivery.receiver  # the fixtures of the delivery tests
outbox = test_delivery.outbox


def receipt_of(db: str, key: str) -> tuple[Any, ...]:
    [state] = sql(db, "SELECT status, provider_id, receipt, receipt_error, sending_since IS NOT"
                      " NULL FROM outbox WHERE idempotency_key = %s", (key,))
    return state


async def test_statuses_find_their_row_and_never_go_back(store: Store, conninfo: str) -> None:
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:reply", conv, "5511")
    add_row(conninfo, "t2:reply", conv, "5511")
    sql(conninfo, "UPDATE outbox SET status = 'delivered', provider_id = 'wamid.1'"
                  " WHERE idempotency_key = 't1:reply'")
    read = Receipt("acme", "wamid.1", "read")
    late_sent = Receipt("acme", "wamid.1", "sent")
    failed = Receipt("acme", "wamid.2", "failed", key="t2:reply",
                     error="131047 outside the 24-hour window: only a template can be sent")
    unknown = Receipt("acme", "wamid.other", "delivered")
    assert await store.record_receipts([read, failed, unknown]) == 2
    assert await store.record_receipts([late_sent]) == 1
    assert receipt_of(conninfo, "t1:reply") == ("delivered", "wamid.1", "read", None, False)
    assert receipt_of(conninfo, "t2:reply") == (
        "pending", "wamid.2", "failed",
        "131047 outside the 24-hour window: only a template can be sent", False)
    # a refused reply hands the conversation to a human
    assert sql(conninfo, "SELECT conversation_id, reason FROM escalations"
                         " WHERE status = 'open'") == [
        (conv, "a reply could not be delivered: 131047 outside the 24-hour window: only a "
               "template can be sent")]
    # several statuses of one message in one body: the furthest wins
    assert await store.record_receipts([Receipt("acme", "wamid.2", "delivered"),
                                        Receipt("acme", "wamid.2", "sent")]) == 2
    assert receipt_of(conninfo, "t2:reply")[2] == "failed"


async def test_an_echo_finds_the_send_in_doubt_by_number_and_text(store: Store,
                                                                  conninfo: str) -> None:
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:reply", conv, "5511")
    sql(conninfo, "UPDATE outbox SET sending_since = now()")
    other = Receipt("acme", "evo-9", "sent", number="5511", text="another text")
    echo = Receipt("acme", "evo-1", "sent", number="5511", text="text of t1:reply")
    assert await store.record_receipts([other]) == 0  # a person typing on the phone
    assert await store.record_receipts([echo]) == 1
    assert receipt_of(conninfo, "t1:reply") == ("pending", "evo-1", "sent", None, True)


def in_doubt(db: str, key: str, seconds_ago: float) -> None:
    """As if a process claimed ``key``, sent it and died before recording the answer."""
    sql(db, "UPDATE outbox SET sending_since = now() - %s * interval '1 second'"
            " WHERE idempotency_key = %s", (seconds_ago, key))


async def test_a_send_in_doubt_that_was_echoed_is_not_sent_again(
        receiver: Receiver, outbox: OutboxStore, store: Store, conninfo: str) -> None:
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:reply", conv, "5511")
    in_doubt(conninfo, "t1:reply", 1.0)
    await store.record_receipts([Receipt("acme", "evo-1", "sent", number="5511",
                                         text="text of t1:reply")])
    async with delivering(make_config(receiver.url, reconcile_s=30), outbox) as run:
        await until(lambda: run.stats.delivered == 1, 10, "reconciled")
    assert receiver.hits == []
    assert run.stats.reconciled == 1
    assert receipt_of(conninfo, "t1:reply") == ("delivered", "evo-1", "sent", None, False)


async def test_a_send_in_doubt_waits_for_the_echo_then_is_sent_again(
        receiver: Receiver, outbox: OutboxStore, conninfo: str) -> None:
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:reply", conv, "5511")
    in_doubt(conninfo, "t1:reply", 0.0)
    receiver.script("5511", Reply(201, b'{"key": {"id": "evo-2"}}'))
    async with delivering(make_config(receiver.url, reconcile_s=0.5), outbox) as run:
        await until(lambda: run.stats.awaiting_echo >= 1, 10, "waiting for the echo")
        assert receiver.hits == []  # nothing sent while the echo may still come
        await until(lambda: run.stats.delivered == 1, 10, "sent again after the bound")
    assert len(receiver.hits) == 1 and run.stats.resent_in_doubt == 1
    assert receipt_of(conninfo, "t1:reply") == ("delivered", "evo-2", None, None, False)


async def test_a_timeout_leaves_the_send_in_doubt(receiver: Receiver, outbox: OutboxStore,
                                                   conninfo: str) -> None:
    """The request may have landed: the retry reconciles before it sends; an answer that
    says it did not land (a 500) leaves no doubt."""
    conv = conversation(conninfo, "5511")
    add_row(conninfo, "t1:reply", conv, "5511")
    receiver.script("5511", Reply(201, b"{}", stall_s=2.0), Reply(201, b'{"key": {"id": "e"}}'))
    cfg = make_config(receiver.url, timeout_s=0.2, reconcile_s=0.3, backoff_initial_s=0.01,
                      backoff_max_s=0.01)
    async with delivering(cfg, outbox) as run:
        await until(lambda: run.stats.delivered == 1, 20, "delivered")
    assert run.stats.retried == 1 and run.stats.resent_in_doubt == 1
    assert len(receiver.hits) == 2

