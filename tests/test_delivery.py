"""Delivery of outbox rows over real HTTP on 127.0.0.1 (a scripted ASGI receiver under
hypercorn's Trio worker), against the embedded database.

These tests run on the real clock: the autojump clock would jump over real socket and
database waits and fire timeouts that did not happen. Timeouts and backoffs are therefore
tens of milliseconds, and every wait is bounded. The backoff schedule itself is checked as a
pure function with exact values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio
from asgi import read_request
from conftest import sql
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from psycopg.types.json import Jsonb

from pipeline.concurrency import Backoff
from pipeline.config import Config, DispatchConfig, InstanceConfig
from pipeline.db import Pool
from pipeline.delivery import (
    DeliveryStats,
    Notifier,
    Step,
    backoff_policy,
    next_step,
    run_delivery,
)
from pipeline.outbox import OutboxRow, OutboxStore
from pipeline.transports import SendResult, classify, retry_after, signature, webhook_request

API_KEY = "evo-api-key-for-tests"
SECRET = "webhook-secret-for-tests"

# --- a scripted receiver ----------------------------------------------------------------------


@attrs.frozen
class Reply:
    """What the receiver answers to one request; ``stall_s`` holds the answer back."""

    status: int = 200
    body: bytes = b"{}"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    stall_s: float = 0.0


@attrs.frozen
class Hit:
    who: str  # the body's "number" (Evolution) or "to" (Cloud API), else the path
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: Reply


@attrs.define
class Receiver:
    """An ASGI app that records every request and answers from a per-recipient script (then
    with ``default``); it can fail, stall, throttle or recover after N failures."""

    default: Reply = Reply(200)
    scripts: dict[str, list[Reply]] = attrs.Factory(dict)
    hits: list[Hit] = attrs.Factory(list)
    active: int = 0
    peak_active: int = 0
    url: str = ""

    def script(self, who: str, *replies: Reply) -> None:
        self.scripts[who] = list(replies)

    def of(self, who: str) -> list[Hit]:
        return [h for h in self.hits if h.who == who]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            await self._answer(scope, body, send)
        finally:
            self.active -= 1

    async def _answer(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        who = _recipient(body) or scope["path"]
        queued = self.scripts.get(who)
        reply = queued.pop(0) if queued else self.default
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.hits.append(Hit(who, scope["path"], headers, body, trio.current_time(), reply))
        if reply.stall_s:
            await trio.sleep(reply.stall_s)
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": [(b"content-type", b"application/json"), *reply.headers]})
        await send({"type": "http.response.body", "body": reply.body})


def _recipient(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict):
        for field in ("number", "to"):
            if isinstance(data.get(field), str):
                return str(data[field])
    return None


async def _serve(app: Receiver, task_status: trio.TaskStatus[list[str]]) -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.1
    await hypercorn_serve(app, config, shutdown_trigger=trio.sleep_forever,  # type: ignore
                          task_status=task_status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = Receiver()
    async with trio.open_nursery() as nursery:
        [app.url] = await nursery.start(_serve, app)
        yield app
        nursery.cancel_scope.cancel()


# --- rows, config and the running task --------------------------------------------------------


def conversation(db: str, sender: str) -> int:
    sql(db, "INSERT INTO instances (name) VALUES ('acme') ON CONFLICT DO NOTHING")
    [(conv,)] = sql(db, "INSERT INTO conversations (instance, sender) VALUES ('acme', %s)"
                        " RETURNING id", (sender,))
    assert isinstance(conv, int)
    return conv


def add_row(db: str, key: str, conv: int | None, target: str, *, kind: str = "reply",
            payload: dict[str, Any] | None = None, due_in_s: float = 0.0) -> int:
    payload = payload if payload is not None else {"to": target, "text": f"text of {key}"}
    [(row_id,)] = sql(
        db, "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target,"
            " payload, next_attempt_at) VALUES (%s, %s, 'acme', %s, %s, %s,"
            " now() + %s * interval '1 second') RETURNING id",
        (key, kind, conv, target, Jsonb(payload), due_in_s))
    assert isinstance(row_id, int)
    return row_id


def row_state(db: str, key: str) -> tuple[Any, ...]:
    [state] = sql(db, "SELECT status, attempts, delivered_at IS NOT NULL, last_error"
                      " FROM outbox WHERE idempotency_key = %s", (key,))
    return state


def make_config(url: str, **dispatch: Any) -> Config:
    settings: dict[str, Any] = {
        "transport": "evolution", "base_url": url, "api_key": API_KEY, "max_attempts": 5,
        "backoff_initial_s": 0.02, "backoff_max_s": 0.1, "timeout_s": 0.5, "concurrency": 4,
        "poll_interval_s": 0.05, "per_recipient_gap_s": 0.0}
    settings.update(dispatch)
    instance = InstanceConfig(name="acme", phone_number_id="1122334455",
                              evolution_instance="acme-evo", webhook_secret=SECRET)
    return Config(dispatch=DispatchConfig(**settings), instances=(instance,))


@pytest.fixture
def outbox(pool: Pool) -> OutboxStore:
    return OutboxStore(pool, query_timeout_s=5.0)


@attrs.frozen
class Running:
    stats: DeliveryStats
    wake: Notifier
    stopping: trio.Event
    scope: trio.CancelScope


@asynccontextmanager
async def delivering(cfg: Config, outbox: OutboxStore,
                     rng: random.Random | None = None) -> AsyncIterator[Running]:
    """Run the delivery task for the block; on exit ask it to stop and wait until it has."""
    wake, stopping = Notifier(), trio.Event()
    async with trio.open_nursery() as nursery:
        stats = await nursery.start(partial(run_delivery, cfg, outbox, wake=wake,
                                            stopping=stopping, rng=rng))
        yield Running(stats, wake, stopping, nursery.cancel_scope)
        stopping.set()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (real clock, bounded) until ``condition()`` holds."""
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 -- state of a real server and a real task
            await trio.sleep(0.002)


# --- request shapes ---------------------------------------------------------------------------


async def test_evolution_send_text(receiver: Receiver, outbox: OutboxStore,
                                   conninfo: str) -> None:
    receiver.default = Reply(201, b'{"key": {"id": "BAE5"}}')
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    [hit] = receiver.hits
    assert hit.path == "/message/sendText/acme-evo"
    assert hit.headers["apikey"] == API_KEY
    assert hit.headers["content-type"] == "application/json"
    assert json.loads(hit.body) == {"number": "5511999", "text": "text of t1:reply"}
    assert row_state(conninfo, "t1:reply") == ("delivered", 1, True, None)


async def test_cloud_api_messages(receiver: Receiver, outbox: OutboxStore,
                                  conninfo: str) -> None:
    add_row(conninfo, "t1:handover", conversation(conninfo, "5511999"), "5511999",
            kind="handover")
    cfg = make_config(f"{receiver.url}/v21.0/", transport="cloud-api")
    async with delivering(cfg, outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    [hit] = receiver.hits
    assert hit.path == "/v21.0/1122334455/messages"
    assert hit.headers["authorization"] == f"Bearer {API_KEY}"
    assert json.loads(hit.body) == {"messaging_product": "whatsapp", "to": "5511999",
                                    "type": "text", "text": {"body": "text of t1:handover"},
                                    "biz_opaque_callback_data": "t1:handover"}
    assert row_state(conninfo, "t1:handover") == ("delivered", 1, True, None)


async def test_webhook_is_signed_over_the_exact_body(receiver: Receiver, outbox: OutboxStore,
                                                     conninfo: str) -> None:
    payload = {"event": "turn", "turn_id": "t1", "reply": "olá", "messages": ["wamid.1"]}
    add_row(conninfo, "t1:webhook", conversation(conninfo, "5511999"),
            f"{receiver.url}/hooks/acme?tenant=7", kind="webhook", payload=payload)
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    [hit] = receiver.hits
    expected = "sha256=" + hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(hit.headers["x-pipeline-signature"], expected)
    assert hit.path == "/hooks/acme"
    assert json.loads(hit.body) == payload
    assert hit.headers["idempotency-key"] == "t1:webhook"
    assert hit.headers["x-pipeline-event"] == "turn"
    assert "apikey" not in hit.headers and "authorization" not in hit.headers


def test_webhook_without_secret_is_not_signed() -> None:
    row = OutboxRow(1, "t1:webhook", "webhook", "acme", 1, "http://h/x", {"event": "turn"}, 0)
    request = webhook_request(row, InstanceConfig(name="acme"))
    assert "x-pipeline-signature" not in request.headers
    signed = webhook_request(row, InstanceConfig(name="acme", webhook_secret="k"))
    assert signed.headers["x-pipeline-signature"] == signature(request.body, "k")


async def test_dry_transport_sends_nothing_and_counts_delivered(
    receiver: Receiver, outbox: OutboxStore, conninfo: str,
) -> None:
    conv = conversation(conninfo, "5511999")
    add_row(conninfo, "t1:reply", conv, "5511999")
    add_row(conninfo, "t1:webhook", conv, f"{receiver.url}/hooks", kind="webhook",
            payload={"event": "turn"})
    async with delivering(make_config(receiver.url, transport="dry"), outbox) as run:
        await until(lambda: run.stats.delivered == 2)
    assert receiver.hits == []
    assert sql(conninfo, "SELECT status, attempts FROM outbox") == [("delivered", 1)] * 2


# --- retries and dead letters -----------------------------------------------------------------


async def test_retry_then_success(receiver: Receiver, outbox: OutboxStore,
                                  conninfo: str) -> None:
    receiver.script("5511999", Reply(500, b"down"), Reply(502), Reply(201))
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    assert [h.answered.status for h in receiver.hits] == [500, 502, 201]
    assert attrs.asdict(run.stats) == {"delivered": 1, "retried": 2, "dead": 0, "db_errors": 0,
                                       "unrecorded": 0, "in_flight": 0, "peak_in_flight": 1,
                                       "reconciled": 0, "awaiting_echo": 0,
                                       "resent_in_doubt": 0}
    assert row_state(conninfo, "t1:reply") == ("delivered", 3, True, None)


async def test_client_error_is_a_dead_letter_at_once(receiver: Receiver, outbox: OutboxStore,
                                                     conninfo: str) -> None:
    receiver.script("5511999", Reply(400, b'{"error": "number does not exist"}'))
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.dead == 1)
    assert len(receiver.hits) == 1
    status, attempts, delivered, error = row_state(conninfo, "t1:reply")
    assert (status, attempts, delivered) == ("dead", 1, False)
    assert re.fullmatch(r'refused at attempt 1: http 400: \{"error": "number does not exist"\}',
                        error)
    [letter] = sql(conninfo, "SELECT stage, reason, instance, message_id, payload"
                             " FROM dead_letters")
    assert letter == ("dispatch", error, "acme", "t1:reply",
                      {"to": "5511999", "text": "text of t1:reply"})


async def test_max_attempts_then_dead_letter(receiver: Receiver, outbox: OutboxStore,
                                             conninfo: str) -> None:
    receiver.default = Reply(503, b"maintenance")
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    async with delivering(make_config(receiver.url, max_attempts=3), outbox) as run:
        await until(lambda: run.stats.dead == 1)
    assert len(receiver.hits) == 3
    assert (run.stats.retried, run.stats.delivered) == (2, 0)
    status, attempts, _, error = row_state(conninfo, "t1:reply")
    assert (status, attempts) == ("dead", 3)
    assert re.fullmatch(r"gave up after 3 attempts: http 503: maintenance", error)
    assert sql(conninfo, "SELECT count(*) FROM dead_letters WHERE stage = 'dispatch'") == [(1,)]


async def test_retry_after_is_honoured(receiver: Receiver, outbox: OutboxStore,
                                       conninfo: str) -> None:
    receiver.script("5511999", Reply(429, headers=((b"retry-after", b"0.3"),)), Reply(201))
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    # our own backoff would retry within 10 ms; the receiver asks for 300 ms (cap 1 s)
    cfg = make_config(receiver.url, backoff_initial_s=0.01, backoff_max_s=1.0)
    async with delivering(cfg, outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    first, second = receiver.hits
    assert 0.3 <= second.at - first.at < 0.8


async def test_connection_refused_is_retried(outbox: OutboxStore, conninfo: str) -> None:
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    # a port nothing listens on: bind one and close it
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    async with delivering(make_config(f"http://127.0.0.1:{port}", max_attempts=2),
                          outbox) as run:
        await until(lambda: run.stats.dead == 1)
    assert run.stats.retried == 1
    assert re.match(r"^gave up after 2 attempts: connection error: ",
                    row_state(conninfo, "t1:reply")[3])


async def test_secrets_never_reach_the_error_text(receiver: Receiver, outbox: OutboxStore,
                                                  conninfo: str) -> None:
    receiver.default = Reply(401, f"bad apikey {API_KEY}".encode())
    add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.dead == 1)
    assert row_state(conninfo, "t1:reply")[3] == "refused at attempt 1: http 401: bad apikey ***"
    assert sql(conninfo, "SELECT count(*) FROM dead_letters WHERE reason LIKE %s",
               (f"%{API_KEY}%",)) == [(0,)]


async def test_unsendable_rows_are_dead_letters_at_once(receiver: Receiver, outbox: OutboxStore,
                                                        conninfo: str) -> None:
    add_row(conninfo, "t1:reply", conversation(conninfo, "A"), "A", payload={"to": "A"})
    sql(conninfo, "UPDATE outbox SET instance = 'gone'")
    add_row(conninfo, "t2:reply", conversation(conninfo, "B"), "B", payload={"text": ""})
    async with delivering(make_config(receiver.url, transport="cloud-api"), outbox) as run:
        await until(lambda: run.stats.dead == 2)
    assert receiver.hits == []
    assert sql(conninfo, "SELECT message_id, reason FROM dead_letters ORDER BY message_id") == [
        ("t1:reply", "refused at attempt 1: instance 'gone' is not configured"),
        ("t2:reply", "refused at attempt 1: outbox row t2:reply: payload has no text")]


# --- concurrency and order --------------------------------------------------------------------


async def test_a_stalled_conversation_does_not_delay_another(
    receiver: Receiver, outbox: OutboxStore, conninfo: str,
) -> None:
    receiver.script("A", Reply(201, stall_s=5.0))
    add_row(conninfo, "a1:reply", conversation(conninfo, "A"), "A")
    cfg = make_config(receiver.url, timeout_s=1.0, max_attempts=1)
    async with delivering(cfg, outbox) as run:
        await until(lambda: len(receiver.of("A")) == 1)
        add_row(conninfo, "b1:reply", conversation(conninfo, "B"), "B")
        notified = trio.current_time()
        run.wake.notify()
        await until(lambda: run.stats.delivered == 1)
        b_done = trio.current_time()
        assert receiver.of("A")[0].answered.stall_s and run.stats.in_flight == 1  # A stalls
        assert row_state(conninfo, "a1:reply")[0] == "pending"
        await until(lambda: run.stats.dead == 1)
        a_done = trio.current_time()
    [b] = receiver.of("B")
    assert b.at - notified < 0.3 and b_done - notified < 0.4  # B went through at once ...
    assert a_done - b_done > 0.3  # ... while A still had most of its 1 s timeout to wait
    assert row_state(conninfo, "a1:reply")[3] == "gave up after 1 attempts: timeout after 1.0 s"


async def test_per_conversation_order(receiver: Receiver, outbox: OutboxStore,
                                      conninfo: str) -> None:
    receiver.script("A", Reply(500), Reply(500), Reply(201), Reply(201))
    a, b = conversation(conninfo, "A"), conversation(conninfo, "B")
    add_row(conninfo, "a1:reply", a, "A", payload={"text": "first"})
    add_row(conninfo, "a2:reply", a, "A", payload={"text": "second"})
    add_row(conninfo, "b1:reply", b, "B")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 3)
    sent = [(json.loads(h.body)["text"], h.answered.status) for h in receiver.of("A")]
    assert sent == [("first", 500), ("first", 500), ("first", 201), ("second", 201)]
    assert receiver.of("B")[0].at < receiver.of("A")[2].at  # B did not wait for A's retries


async def test_a_dead_head_lets_the_next_row_through(receiver: Receiver, outbox: OutboxStore,
                                                     conninfo: str) -> None:
    receiver.script("A", Reply(400))
    a = conversation(conninfo, "A")
    add_row(conninfo, "a1:reply", a, "A")
    add_row(conninfo, "a2:reply", a, "A")
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: run.stats.delivered == 1)
    assert [row_state(conninfo, k)[0] for k in ("a1:reply", "a2:reply")] == ["dead", "delivered"]


async def test_concurrency_is_bounded(receiver: Receiver, outbox: OutboxStore,
                                      conninfo: str) -> None:
    for n in range(6):
        receiver.script(f"C{n}", Reply(201, stall_s=0.1))
        add_row(conninfo, f"c{n}:reply", conversation(conninfo, f"C{n}"), f"C{n}")
    async with delivering(make_config(receiver.url, concurrency=2), outbox) as run:
        await until(lambda: run.stats.delivered == 6)
    assert (run.stats.peak_in_flight, receiver.peak_active) == (2, 2)


class LookingOutbox(OutboxStore):
    """The real outbox statements; ``looks`` has the number of rows each claim returned."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool, query_timeout_s=5.0)
        self.looks: list[int] = []

    async def claim(self, limit: int, **kwargs: Any) -> list[OutboxRow]:
        rows = await super().claim(limit, **kwargs)
        self.looks.append(len(rows))
        return rows


async def test_notify_wakes_the_task_before_the_poll(receiver: Receiver, pool: Pool,
                                                     conninfo: str) -> None:
    outbox = LookingOutbox(pool)
    async with delivering(make_config(receiver.url, poll_interval_s=30.0), outbox) as run:
        # the task has looked once, found nothing, and sleeps for 30 s (it reaches the wait
        # with no checkpoint after the claim returns)
        await until(lambda: outbox.looks == [0])
        add_row(conninfo, "t1:reply", conversation(conninfo, "5511999"), "5511999")
        notified = trio.current_time()
        run.wake.notify()
        await until(lambda: run.stats.delivered == 1, timeout_s=2.0)
    assert receiver.hits[0].at - notified < 0.5
    assert outbox.looks[:2] == [0, 1]  # the notice, not a poll, made the second look


# --- shutdown and cancellation ----------------------------------------------------------------


async def test_stopping_finishes_sends_in_flight(receiver: Receiver, outbox: OutboxStore,
                                                 conninfo: str) -> None:
    receiver.script("A", Reply(201, stall_s=0.2))
    add_row(conninfo, "a1:reply", conversation(conninfo, "A"), "A")
    add_row(conninfo, "later:reply", conversation(conninfo, "B"), "B", due_in_s=60)
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: len(receiver.hits) == 1)
        run.stopping.set()
    assert run.stats.delivered == 1
    assert await outbox.counts() == {"delivered": 1, "pending": 1}
    assert row_state(conninfo, "a1:reply")[0] == "delivered"
    assert row_state(conninfo, "later:reply")[:2] == ("pending", 0)


async def test_cancel_mid_send_leaves_the_row_pending(receiver: Receiver, outbox: OutboxStore,
                                                      conninfo: str) -> None:
    receiver.script("/hooks", Reply(200, stall_s=5.0))
    add_row(conninfo, "t1:webhook", conversation(conninfo, "A"), f"{receiver.url}/hooks",
            kind="webhook", payload={"event": "turn"})
    async with delivering(make_config(receiver.url), outbox) as run:
        await until(lambda: len(receiver.hits) == 1)
        run.scope.cancel()
    assert run.stats.delivered == 0
    assert row_state(conninfo, "t1:webhook") == ("pending", 0, False, None)
    assert sql(conninfo, "SELECT next_attempt_at <= now() FROM outbox") == [(True,)]  # released
    async with delivering(make_config(receiver.url), outbox) as run:  # the next start
        await until(lambda: run.stats.delivered == 1)
    assert [h.headers["idempotency-key"] for h in receiver.hits] == ["t1:webhook"] * 2
    assert row_state(conninfo, "t1:webhook") == ("delivered", 1, True, None)


# --- the outbox statements --------------------------------------------------------------------


async def test_claim_takes_only_each_conversations_due_head(outbox: OutboxStore,
                                                            conninfo: str) -> None:
    a, b, c = (conversation(conninfo, s) for s in "ABC")
    a1, _a2 = add_row(conninfo, "a1", a, "A"), add_row(conninfo, "a2", a, "A")
    b1 = add_row(conninfo, "b1", b, "B", due_in_s=60)  # head not due: B waits entirely
    add_row(conninfo, "b2", b, "B")
    c1 = add_row(conninfo, "c1", c, "C")
    orphan = add_row(conninfo, "o1", None, "X")
    busy = [c * 2]  # the lane of conversation C's replies (its webhook events: c * 2 + 1)
    assert [r.id for r in await outbox.claim(10, busy=busy, lease_s=30)] == [a1, orphan]
    assert await outbox.claim(10, lease_s=30) == [await _row(outbox, c1)]  # a1, o1 leased
    future = await outbox.claim(10, lease_s=30, now=_in(conninfo, 120))
    assert [r.id for r in future] == [a1, b1, c1, orphan]  # leases and due times have passed


async def _row(outbox: OutboxStore, row_id: int) -> OutboxRow:
    rows = await outbox._all("SELECT id, idempotency_key, kind, instance, conversation_id,"
                             " target, payload, attempts FROM outbox WHERE id = %s", (row_id,))
    return OutboxRow(*rows[0])


def _in(db: str, seconds: float) -> Any:
    [(at,)] = sql(db, "SELECT now() + %s * interval '1 second'", (seconds,))
    return at


async def test_mark_dead_writes_the_row_and_the_letter_together(outbox: OutboxStore,
                                                                conninfo: str) -> None:
    row = add_row(conninfo, "a1", conversation(conninfo, "A"), "A")
    assert await outbox.mark_dead(row, "refused")
    assert not await outbox.mark_dead(row, "again")  # no longer pending: nothing written
    assert not await outbox.mark_delivered(row)
    assert sql(conninfo, "SELECT status, attempts, last_error FROM outbox") == [
        ("dead", 1, "refused")]
    assert sql(conninfo, "SELECT stage, reason FROM dead_letters") == [("dispatch", "refused")]


# --- pure decisions ---------------------------------------------------------------------------


def test_backoff_schedule_doubles_up_to_the_cap() -> None:
    dispatch = DispatchConfig(max_attempts=10, backoff_initial_s=1.0, backoff_max_s=60.0)
    ceilings = attrs.evolve(backoff_policy(dispatch), jitter=False)
    assert [ceilings.pause(n, random.Random()) for n in range(1, 10)] == [
        1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_has_full_jitter() -> None:
    policy = backoff_policy(DispatchConfig(backoff_initial_s=1.0, backoff_max_s=60.0))
    seeded, replay = random.Random(3), random.Random(3)
    assert [policy.pause(n, seeded) for n in (1, 4, 9)] == [
        replay.uniform(0, 1), replay.uniform(0, 8), replay.uniform(0, 60)]
    draws = [policy.pause(4, seeded) for _ in range(1000)]
    assert 0 <= min(draws) < 0.1 and 7.9 < max(draws) <= 8  # anywhere in [0, ceiling]


class _Top(random.Random):
    """Jitter that always draws its upper bound: makes the schedule exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(("result", "before", "step"), [
    (SendResult("delivered", "http 201", 201), 0, Step("delivered")),
    (SendResult("retry", "http 500", 500), 0, Step("retry", "http 500", 1.0)),
    (SendResult("retry", "http 500", 500), 2, Step("retry", "http 500", 4.0)),
    (SendResult("retry", "http 429", 429, retry_after_s=7.0), 0, Step("retry", "http 429", 7.0)),
    (SendResult("retry", "timeout after 10.0 s"), 4,
     Step("dead", "gave up after 5 attempts: timeout after 10.0 s")),
    (SendResult("final", "http 404: no such number", 404), 1,
     Step("dead", "refused at attempt 2: http 404: no such number")),
])
def test_next_step(result: SendResult, before: int, step: Step) -> None:
    policy = Backoff(attempts=5, initial_s=1.0, max_s=60.0)
    assert next_step(result, before, policy, _Top()) == step


@pytest.mark.parametrize(("status", "headers", "verdict", "wait"), [
    (200, {}, "delivered", None),
    (201, {}, "delivered", None),
    (204, {}, "delivered", None),
    (400, {}, "final", None),
    (401, {}, "final", None),
    (404, {"retry-after": "5"}, "final", None),
    (408, {}, "retry", None),
    (429, {}, "retry", None),
    (429, {"retry-after": "5"}, "retry", 5.0),
    (429, {"retry-after": "3600"}, "retry", 60.0),  # capped at backoff_max_s
    (500, {"retry-after": "5"}, "retry", None),  # only 429 and 503 carry a useful one
    (503, {"retry-after": "2.5"}, "retry", 2.5),
    (503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, "retry", None),
])
def test_classify(status: int, headers: dict[str, str], verdict: str,
                  wait: float | None) -> None:
    result = classify(status, headers, "", retry_after_cap_s=60.0)
    assert (result.verdict, result.retry_after_s, result.status) == (verdict, wait, status)


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0.0), (" 12 ", 12.0), ("1e9", 60.0), ("-1", None), ("nan", None), ("soon", None),
    (None, None),
])
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert retry_after(value, 60.0) == seconds
