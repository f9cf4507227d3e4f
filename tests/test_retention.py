"""Retention and indexes: old finished rows go in batches, pending work stays, and the hot
statements read only what they need however much history the tables hold."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import pytest
import trio
from conftest import sql
from loguru import logger

from pipeline.config import RetentionConfig, parse_config
from pipeline.db import DatabaseUnavailable
from pipeline.engine import Pipeline
from pipeline.outbox import OutboxStore
from pipeline.retention import RetentionStore, Sweep, run_pass, run_retention, sweeps
from pipeline.store import ClaimRequest, ContextRequest, Store
from pipeline.vclock import VirtualClock
from stages.outcomes import OutcomeSink
from stages.turns import BurstRules

DAY = dt.timedelta(days=1)


# --- the rule (pure) ---------------------------------------------------------------------------

def test_zero_days_keeps_a_kind_forever() -> None:
    assert sweeps(RetentionConfig()) == (
        Sweep("inbox", 30 * DAY), Sweep("outbox", 30 * DAY),
        Sweep("dead outbox", 90 * DAY), Sweep("dead letters", 90 * DAY))
    assert sweeps(RetentionConfig(inbox_days=7, outbox_days=0, dead_letters_days=0)) == (
        Sweep("inbox", 7 * DAY),)
    assert sweeps(RetentionConfig(inbox_days=0, outbox_days=0, dead_letters_days=0)) == ()


# --- what a pass deletes (real PostgreSQL) -----------------------------------------------------

def _old_and_new_rows(db: str) -> None:
    """Of each kind: finished rows 40 (or 100) days old and 1 day old, and pending work that
    is just as old."""
    sql(db, "INSERT INTO instances (name) VALUES ('acme');"
        " INSERT INTO conversations (instance, sender) VALUES ('acme', 's')")
    inbox = ("INSERT INTO inbox (instance, message_id, sender, format, received_at, message,"
             " status, action, processed_at)"
             " SELECT 'acme', %s::text || g, 's', 'evolution', now() - %s::interval, '{}', %s,"
             " %s, now() - %s::interval"
             " FROM generate_series(1, %s) g")
    sql(db, inbox, ("old", 40 * DAY, "processed", "replied", 40 * DAY, 5))
    sql(db, inbox, ("new", DAY, "processed", "merged", DAY, 2))
    sql(db, inbox, ("pending", 40 * DAY, "pending", None, None, 2))
    outbox = ("INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target,"
              " payload, status, created_at, delivered_at)"
              " SELECT %s::text || g, 'reply', 'acme', 1, 's', '{}', %s,"
              " now() - %s::interval, now() - %s::interval"
              " FROM generate_series(1, %s) g")
    sql(db, outbox, ("old", "delivered", 40 * DAY, 40 * DAY, 5))
    sql(db, outbox, ("new", "delivered", DAY, DAY, 1))
    sql(db, outbox, ("pending", "pending", 40 * DAY, None, 2))
    sql(db, outbox, ("dead-old", "dead", 100 * DAY, None, 1))
    sql(db, outbox, ("dead-new", "dead", 10 * DAY, None, 1))
    sql(db, "INSERT INTO dead_letters (stage, reason, created_at)"
        " SELECT 'intake', 'bad ' || g, now() - %s::interval FROM generate_series(1, %s) g",
        (100 * DAY, 3))
    sql(db, "INSERT INTO dead_letters (stage, reason) VALUES ('intake', 'bad but recent')")
    sql(db, "INSERT INTO escalations (conversation_id, reason, created_at)"
        " VALUES (1, 'keyword', now() - %s)", (100 * DAY,))
    sql(db, "INSERT INTO messages (conversation_id, instance, message_id, role, body, sent_at)"
        " VALUES (1, 'acme', 'old1', 'user', 'hi', now() - %s)", (100 * DAY,))


def _left(db: str) -> dict[str, list[str]]:
    return {
        "inbox": [k for (k,) in sql(db, "SELECT message_id FROM inbox ORDER BY id")],
        "outbox": [k for (k,) in sql(db, "SELECT idempotency_key FROM outbox ORDER BY id")],
        "dead_letters": [r for (r,) in sql(db, "SELECT reason FROM dead_letters ORDER BY id")],
        "others": [str(n) for (n,) in sql(db, "SELECT (SELECT count(*) FROM conversations)"
                                          " + (SELECT count(*) FROM escalations)"
                                          " + (SELECT count(*) FROM messages)")],
    }


class Recording(RetentionStore):
    """The real statements, each batch's count noted."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[tuple[str, int]] = []

    async def delete(self, sweep: Sweep, rows: int, now: dt.datetime | None = None) -> int:
        n = await super().delete(sweep, rows, now)
        self.batches.append((sweep.kind, n))
        return n


async def test_a_pass_deletes_only_old_finished_rows_in_batches(pool: Any, conninfo: str) -> None:
    _old_and_new_rows(conninfo)
    store = Recording(pool, 5.0)
    cfg = RetentionConfig(batch_rows=2, batch_pause_ms=0)
    deleted = await run_pass(store, cfg)
    assert deleted == {"inbox": 5, "outbox": 5, "dead outbox": 1, "dead letters": 3}
    assert store.batches == [("inbox", 2), ("inbox", 2), ("inbox", 1),
                             ("outbox", 2), ("outbox", 2), ("outbox", 1),
                             ("dead outbox", 1), ("dead letters", 2), ("dead letters", 1)]
    assert store.round_trips == 9
    assert _left(conninfo) == {
        "inbox": ["new1", "new2", "pending1", "pending2"],
        "outbox": ["new1", "pending1", "pending2", "dead-new1"],
        "dead_letters": ["bad but recent"],
        "others": ["3"],  # conversation, open escalation and message: never deleted
    }
    assert await run_pass(store, cfg) == {"inbox": 0, "outbox": 0, "dead outbox": 0,
                                          "dead letters": 0}


async def test_ages_are_measured_from_now_and_zero_keeps(pool: Any, conninfo: str) -> None:
    _old_and_new_rows(conninfo)
    store = RetentionStore(pool, 5.0)
    cfg = RetentionConfig(inbox_days=2, outbox_days=0, dead_letters_days=0, batch_pause_ms=0)
    assert await run_pass(store, cfg, now=None) == {"inbox": 5}
    in_a_week = sql(conninfo, "SELECT now() + interval '7 days'")[0][0]
    assert await run_pass(store, cfg, now=in_a_week) == {"inbox": 2}  # type: ignore[arg-type]
    assert _left(conninfo)["inbox"] == ["pending1", "pending2"]
    assert len(_left(conninfo)["outbox"]) == 10


# --- the task: every interval, failures logged, stops at once (fake store, virtual time) --------

class Scripted(RetentionStore):
    """Answers each delete from a script: a count, or an exception to raise; records when."""

    def __init__(self, script: list[int | Exception]) -> None:
        super().__init__(None, 5.0)  # type: ignore[arg-type]
        self.script = script
        self.calls: list[float] = []

    async def delete(self, sweep: Sweep, rows: int, now: dt.datetime | None = None) -> int:
        self.calls.append(trio.current_time())
        if not self.script:
            await trio.sleep_forever()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


@pytest.fixture
def warned() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="WARNING",
                      format="{message}")
    yield lines
    logger.remove(sink)


ONLY_INBOX = RetentionConfig(inbox_days=30, outbox_days=0, dead_letters_days=0,
                             interval_s=60.0, batch_rows=2, batch_pause_ms=100)


async def test_passes_every_interval_and_a_failure_waits_for_the_next(
        autojump_clock: trio.testing.MockClock, warned: list[str]) -> None:
    store = Scripted([2, 1, DatabaseUnavailable("database did not answer within 5.0 s"), 0])
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_retention, ONLY_INBOX, store, stopping=stopping))
        await trio.sleep(200)
        stopping.set()
    assert store.calls == pytest.approx([0, 0.1, 60.1, 120.1, 180.1])  # 0.1 s: the pause
    assert warned == ["retention pass failed (database did not answer within 5.0 s); "
                        "next try in 60.0 s"]


async def test_stopping_cancels_a_pass_in_progress(autojump_clock: trio.testing.MockClock) -> None:
    store = Scripted([2])  # then a statement that never answers
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_retention, ONLY_INBOX, store, stopping=stopping))
        await trio.sleep(5)
        stopping.set()
    assert trio.current_time() == 5.0
    assert store.calls == [0.0, 0.1]


async def test_nothing_to_sweep_returns_at_once() -> None:
    keep = RetentionConfig(inbox_days=0, outbox_days=0, dead_letters_days=0)
    store = Scripted([])
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_retention, keep, store))
    assert store.calls == []


# --- which runs sweep (the engine) -------------------------------------------------------------

@pytest.fixture
def virtual_clock() -> VirtualClock:
    return VirtualClock()


@pytest.mark.parametrize(("finite", "roles", "swept"), [
    (False, {"turns"}, True),
    (False, {"delivery"}, True),
    (False, {"webhook"}, False),
    (True, {"webhook", "turns", "delivery"}, False),  # a replay keeps everything
])
async def test_live_runs_that_process_turns_or_deliver_sweep(
        virtual_clock: VirtualClock, store: Store, conninfo: str, finite: bool,
        roles: set[str], swept: bool) -> None:
    _old_and_new_rows(conninfo)
    cfg = parse_config({"instances": [{"name": "acme", "phone_number_id": "1"}]}, "test")
    pipeline = Pipeline(cfg, store, OutcomeSink(), finite=finite, roles=frozenset(roles))

    async def source(inlets: Any) -> None:
        if not finite:
            await inlets.stopping.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, source)
        await trio.sleep(1)  # virtual: the first pass is over once every task waits
        pipeline.stop_sources()
    assert len(_left(conninfo)["inbox"]) == (4 if swept else 9)


# --- the hot statements stay index scans over 200,000 rows of history --------------------------

HISTORY = 200_000
CONVERSATIONS = 2_000
BIG = {"inbox", "outbox", "messages", "escalations", "ai_interactions", "dead_letters"}
#: the most rows one scan of a big table may read: 1 % of the history
MOST_ROWS = HISTORY // 100

_AGO = f"now() - make_interval(secs => ({HISTORY} - g) * 26)"  # two months, oldest first
_CONV = f"(g % {CONVERSATIONS} + 1)"
_FILL = [  # independent of each other: run at once
    "INSERT INTO inbox (instance, message_id, sender, format, received_at, message, status,"
    f" action, turn_id, processed_at) SELECT 'acme', 'h' || g, 's' || {_CONV}, 'cloud-api',"
    f" {_AGO}, '{{\"text\": \"hi\"}}', 'processed', 'replied', 't' || g, {_AGO}"
    f" FROM generate_series(1, {HISTORY}) g",
    "INSERT INTO messages (conversation_id, instance, message_id, role, body, turn_id, sent_at)"
    f" SELECT {_CONV}, 'acme', 'h' || g, 'user', 'hi', 't' || g, {_AGO}"
    f" FROM generate_series(1, {HISTORY}) g",
    "INSERT INTO ai_interactions (conversation_id, turn_id, responder, prompt, reply,"
    f" confidence, fallback, created_at) SELECT {_CONV}, 't' || g, 'rules', 'hi', 'hello',"
    f" 0.9, g % 7 = 0, {_AGO} FROM generate_series(1, {HISTORY}) g",
    "INSERT INTO escalations (conversation_id, status, reason, created_at, resolved_at)"
    f" SELECT {_CONV}, 'resolved', 'keyword', {_AGO}, {_AGO}"
    f" FROM generate_series(1, {HISTORY}) g",
    "INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload,"
    " status, attempts, next_attempt_at, created_at, delivered_at)"
    f" SELECT 't' || g || ':reply', 'reply', 'acme', {_CONV}, 's', '{{}}', 'delivered', 1,"
    f" {_AGO}, {_AGO}, {_AGO} FROM generate_series(1, {HISTORY}) g",
    f"INSERT INTO dead_letters (stage, reason, created_at) SELECT 'intake', 'bad', {_AGO}"
    f" FROM generate_series(1, {HISTORY} / 10) g",
]
_PENDING = """
INSERT INTO inbox (instance, message_id, sender, format, received_at, message)
SELECT 'acme', 'p' || g, 's' || (g % 3 + 1), 'cloud-api', now() - interval '1 minute',
       '{"text": "hi"}' FROM generate_series(1, 9) g;
UPDATE conversations SET pending = 3, due_at = now() - interval '1 minute' WHERE id <= 3;
INSERT INTO escalations (conversation_id, reason) VALUES (7, 'keyword');
-- a delivery outage: 5,000 replies and events queued in 500 lanes
INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload)
SELECT 'p' || g, CASE WHEN g % 4 = 0 THEN 'webhook' ELSE 'reply' END, 'acme', g % 500 + 1,
       's', '{}' FROM generate_series(1, 5000) g;
ANALYZE;"""


def _fill_history(db: str) -> None:
    sql(db, "INSERT INTO instances (name, phone_number_id) VALUES ('acme', '1');"
        " INSERT INTO conversations (instance, sender, last_message_at)"
        f" SELECT 'acme', 's' || c, now() FROM generate_series(1, {CONVERSATIONS}) c")
    with ThreadPoolExecutor(len(_FILL)) as threads:
        list(threads.map(partial(sql, db), _FILL))
    sql(db, _PENDING)


class Captured(Exception):
    def __init__(self, sql: str, params: Any) -> None:
        self.sql, self.params = sql, params


class _Capturing:
    """Raises the statement a method would run, with its parameters, instead of running it."""

    async def _all(self, sql: str, params: Any = None, timeout: float | None = None) -> Any:
        raise Captured(sql, params)


class CaptureStore(_Capturing, Store):
    pass


class CaptureOutbox(_Capturing, OutboxStore):
    pass


class CaptureRetention(_Capturing, RetentionStore):
    pass


async def _statement(call: Awaitable[object]) -> Captured:
    with pytest.raises(Captured) as caught:
        await call
    return caught.value


def _scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "Relation Name" in node:
        yield node
    for child in node.get("Plans", ()):
        yield from _scans(child)


def _problems(db: str, captured: Captured) -> list[str]:
    """Runs the statement under EXPLAIN ANALYZE (rolled back): every scan of a big table
    that is sequential or reads more than MOST_ROWS rows."""
    import psycopg

    with psycopg.connect(db) as conn, conn.transaction(force_rollback=True):
        [(plan,)] = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + captured.sql,
                                 captured.params).fetchall()
    found = []
    for scan in _scans(plan[0]["Plan"]):
        rows = (scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
                + scan.get("Rows Removed by Index Recheck", 0)) * scan["Actual Loops"]
        if scan["Relation Name"] in BIG and (scan["Node Type"] == "Seq Scan"
                                              or rows > MOST_ROWS):
            found.append(f"{scan['Node Type']} on {scan['Relation Name']} "
                         f"({scan.get('Index Name')}): {rows:.0f} rows")
    return found


@pytest.mark.slow
async def test_hot_statements_are_index_scans_over_a_large_history(
        pool: Any, conninfo: str) -> None:
    started = time.perf_counter()
    await trio.to_thread.run_sync(_fill_history, conninfo)
    filled = time.perf_counter()
    store, outbox = CaptureStore(pool, 5.0), CaptureOutbox(pool, 5.0)
    retention = CaptureRetention(pool, 5.0)
    rules = BurstRules(dt.timedelta(seconds=1.5), 10, dt.timedelta(seconds=5),
                       dt.timedelta(seconds=30))
    statements = {
        "claim": store.claim(ClaimRequest(
            owner="host:1", now=None, limit=64, lease_s=30, rules=rules,
            context=ContextRequest(history_chars=800, recent_interactions=5,
                                   min_confidence=0.5))),
        "history": store.load_history(5, "t_x", 800),
        "fallbacks": store.load_fallbacks(5, "t_x", 5, 0.5),
        "escalated": store.load_escalated(7),
        "open escalations": store.open_escalations(),
        "open escalations of an instance": store.open_escalations("acme"),
        "outbox claim": outbox.claim(16, busy=[4, 9, 11], lease_s=30),
        **{f"retention {s.kind}": retention.delete(s, 1000) for s in sweeps(RetentionConfig())},
    }
    problems = {name: _problems(conninfo, await _statement(call))
                for name, call in statements.items()}
    assert problems == {name: [] for name in statements}
    explained = time.perf_counter()
    print(f"history filled in {filled - started:.1f} s, "  # shown with -s
          f"{len(statements)} statements explained in {explained - filled:.1f} s")
