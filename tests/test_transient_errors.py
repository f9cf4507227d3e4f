"""Brief database errors are retried, not fatal: the retry helper sees through the
ExceptionGroup of a nursery, and the server's "not now" errors (deadlock, serialization
failure, lock not available, a cancellation we did not ask for, too many connections, an
administrator's shutdown) are :class:`DatabaseUnavailable` -- provoked for real on the
embedded PostgreSQL, never mocked. Our own cancellations stay Trio cancellations."""

from __future__ import annotations

import re
from typing import Any

import httpx
import psycopg
import pytest
import trio
import trio.testing
from conftest import sql
from test_webhook import SECRET, _start, cloud_body, signed

from pipeline.concurrency import Backoff, retry, with_retry
from pipeline.config import WebhookConfig
from pipeline.db import (
    DatabaseError,
    DatabaseUnavailable,
    Pool,
    TrioConnection,
    open_pool,
    translate,
)
from pipeline.store import Store
from stages.records import Turn

# --- the retry helper and ExceptionGroups (pure, autojump clock) -----------------------------


class Flaky:
    """An operation that raises ``errors`` one per call, then returns "ok"; it notes the
    virtual time of every call."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []
        self.start = trio.current_time()

    async def __call__(self) -> str:
        self.calls.append(trio.current_time() - self.start)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def group(*errors: Exception) -> ExceptionGroup[Exception]:
    return ExceptionGroup("errors from a nursery", list(errors))


STEADY = Backoff(attempts=4, initial_s=1, max_s=4, jitter=False)


async def test_retry_retries_a_group_whose_leaves_are_all_retryable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    op = Flaky(group(ConnectionError("a")),
               group(ConnectionError("b"), group(ConnectionError("nested"))))
    assert await retry(op, retry_on=(ConnectionError,), policy=STEADY) == "ok"
    assert op.calls == [0, 1, 3]  # pauses 1, 2 as for a bare error


async def test_retry_reraises_a_mixed_group_unchanged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mixed = group(ConnectionError("down"), ValueError("bad input"))
    op = Flaky(mixed)
    with pytest.raises(ExceptionGroup) as info:
        await retry(op, retry_on=(ConnectionError,), policy=STEADY)
    assert info.value is mixed and op.calls == [0]


async def test_retry_reraises_the_last_retryable_group_unchanged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    last = group(ConnectionError("4"))
    op = Flaky(*(group(ConnectionError(str(n))) for n in range(1, 4)), last)
    with pytest.raises(ExceptionGroup) as info:
        await retry(op, retry_on=(ConnectionError,), policy=STEADY)
    assert info.value is last and op.calls == [0, 1, 3, 7]


async def test_on_retry_is_told_the_leaf_not_the_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    told: list[tuple[int, Exception, float]] = []
    op = Flaky(group(ConnectionError("refused")))
    await retry(op, retry_on=(ConnectionError,), policy=STEADY,
                on_retry=lambda *args: told.append(args))
    assert [(a, str(e), p) for a, e, p in told] == [(1, "refused", 1)]


async def test_with_retry_sees_through_a_nursery(autojump_clock: trio.testing.MockClock) -> None:
    failures = [DatabaseUnavailable("server closed the connection")]

    async def load() -> str:
        async def write() -> None:
            if failures:
                raise failures.pop()
        async with trio.open_nursery() as nursery:  # as context mode "parallel" does
            nursery.start_soon(write)
        return "loaded"

    assert await with_retry(load, STEADY, "context") == "loaded"
    assert failures == []


# --- end to end: context mode "parallel" through an outage --------------------------------


class TerminatingStore(Store):
    """The real store whose first ``outages`` inserts of a turn's messages lose their
    connection for real: the statement makes the server terminate its own backend."""

    def __init__(self, store: Store, outages: int) -> None:
        super().__init__(store.pool, store.query_timeout_s)
        self.outages = outages

    async def store_user_messages(self, conversation_id: int, turn: Turn,
                                  timeout: float | None = None) -> None:
        if self.outages > 0:
            self.outages -= 1
            await self._all("SELECT pg_terminate_backend(pg_backend_pid())")
            raise AssertionError("the server should have closed the connection")
        await super().store_user_messages(conversation_id, turn, timeout)


async def test_parallel_context_waits_out_a_lost_connection(store: Store, conninfo: str) -> None:
    from test_context import TABLES, mode_config, replay  # the whole pipeline, as there

    baseline, _ = await replay(store, mode_config("parallel"))
    sql(conninfo, f"TRUNCATE {TABLES} CASCADE")
    faulty = TerminatingStore(store, outages=3)
    outcomes, pipeline = await replay(faulty, mode_config("parallel"))
    assert faulty.outages == 0
    assert pipeline.metrics.counters["failed turns"] == 0
    assert outcomes == baseline  # every turn went through once the database answered again


# --- translate(): the server's "not now" errors, provoked for real ---------------------------


async def translated(pool: Pool, *statements: str) -> DatabaseError:
    """Run ``statements`` on one pooled connection; the translation of the error they end in."""
    async with pool.connection() as conn:
        try:
            for statement in statements:
                await conn.execute(statement)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            return translate(exc)
    raise AssertionError(f"no error from {statements}")


@pytest.fixture
def table(conninfo: str) -> str:
    sql(conninfo, "CREATE TABLE t (id int PRIMARY KEY, v int)")
    sql(conninfo, "INSERT INTO t VALUES (1, 0), (2, 0)")
    return "t"


async def test_deadlock_is_unavailable(conninfo: str, table: str) -> None:
    errors: list[DatabaseError] = []
    a = await TrioConnection.connect_trio(conninfo)
    b = await TrioConnection.connect_trio(conninfo)
    for conn, first in ((a, 1), (b, 2)):
        await conn.execute("SET deadlock_timeout = '20ms'")
        await conn.execute("BEGIN")
        await conn.execute("UPDATE t SET v = 1 WHERE id = %s", (first,))

    async def then(conn: TrioConnection, second: int) -> None:
        try:
            await conn.execute("UPDATE t SET v = 2 WHERE id = %s", (second,))
            await conn.execute("COMMIT")
        except psycopg.Error as exc:
            errors.append(translate(exc))
            await conn.execute("ROLLBACK")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(then, a, 2)
            nursery.start_soon(then, b, 1)
    await a.close()
    await b.close()
    [error] = errors  # the server broke the cycle by failing one of the two
    assert type(error) is DatabaseUnavailable
    assert str(error) == "database refused the statement for now: deadlock detected"


async def test_serialization_failure_is_unavailable(pool: Pool, conninfo: str,
                                                    table: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await conn.execute("SELECT v FROM t WHERE id = 1")  # the snapshot is taken
        sql(conninfo, "UPDATE t SET v = 7 WHERE id = 1")  # another session, committed
        try:
            await conn.execute("UPDATE t SET v = 8 WHERE id = 1")
        except psycopg.Error as exc:
            assert exc.sqlstate == "40001"
            assert type(translate(exc)) is DatabaseUnavailable
        else:
            raise AssertionError("no serialization failure")


async def test_lock_not_available_is_unavailable(pool: Pool, conninfo: str,
                                                table: str) -> None:
    with psycopg.connect(conninfo) as holder:  # another session holds the row
        holder.execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        error = await translated(pool, "SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT")
    assert type(error) is DatabaseUnavailable
    assert re.match(r"^database refused the statement for now: could not obtain lock on row",
                    str(error))


async def test_statement_timeout_of_the_server_is_unavailable(pool: Pool) -> None:
    error = await translated(pool, "SET statement_timeout = '10ms'", "SELECT pg_sleep(5)")
    assert type(error) is DatabaseUnavailable
    assert str(error) == ("database refused the statement for now: "
                          "canceling statement due to statement timeout")


async def test_someone_elses_cancel_is_unavailable(pool: Pool, conninfo: str) -> None:
    errors: list[DatabaseError] = []

    async def sleeper() -> None:
        errors.append(await translated(pool, "SELECT pg_sleep(30)"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await until_sql(conninfo, "SELECT count(*) FROM pg_stat_activity"
                                      " WHERE query = 'SELECT pg_sleep(30)'")
            assert sql(conninfo, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                                 " WHERE query = 'SELECT pg_sleep(30)'") == [(True,)]
    [error] = errors
    assert type(error) is DatabaseUnavailable
    assert str(error) == ("database refused the statement for now: "
                          "canceling statement due to user request")


async def test_administrator_shutdown_is_unavailable(pool: Pool, conninfo: str) -> None:
    async with pool.connection() as conn:
        pid = conn.pgconn.backend_pid
        sql(conninfo, "SELECT pg_terminate_backend(%s)", (pid,))
        try:
            await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            assert type(translate(exc)) is DatabaseUnavailable
        else:
            raise AssertionError("the terminated connection still answered")


async def test_idle_in_transaction_timeout_is_unavailable(pool: Pool, conninfo: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("SET idle_in_transaction_session_timeout = '20ms'")
        await conn.execute("BEGIN")
        await until_sql(conninfo, f"SELECT count(*) = 0 FROM pg_stat_activity"  # closed
                                  f" WHERE pid = {conn.pgconn.backend_pid}")
        try:
            await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            assert type(translate(exc)) is DatabaseUnavailable
        else:
            raise AssertionError("the server did not close the idle transaction")


async def test_too_many_connections_is_unavailable(cluster: Any, conninfo: str) -> None:
    sql(conninfo, "DROP ROLE IF EXISTS limited")
    sql(conninfo, "CREATE ROLE limited LOGIN CONNECTION LIMIT 0")
    try:
        limited = f"{conninfo} user=limited"
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(limited).close()
        assert type(translate(info.value)) is DatabaseUnavailable
        async with open_pool(limited, 1) as pool:
            with pytest.raises(DatabaseUnavailable, match=r"^cannot connect to the database: "
                                                          r".*too many connections"):
                async with pool.connection():
                    pass
    finally:
        sql(conninfo, "DROP ROLE limited")


async def test_our_own_cancellation_stays_a_trio_cancellation(pool: Pool) -> None:
    with trio.move_on_after(0.05) as scope:
        async with pool.connection() as conn:
            await conn.execute("SELECT pg_sleep(5)")
    assert scope.cancelled_caught
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.05):
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(5)")
    async with pool.connection() as conn:  # and the connection is usable afterwards
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)


async def test_data_errors_stay_database_errors(pool: Pool) -> None:
    error = await translated(pool, "SELECT 1 / 0")
    assert type(error) is DatabaseError
    error = await translated(pool, "SELECT * FROM no_such_table")
    assert type(error) is DatabaseError


async def until_sql(conninfo: str, query: str) -> None:
    """Wait (real clock: the server works in real time) until ``query`` counts a row."""
    while sql(conninfo, query) in ([(0,)], [(False,)]):  # noqa: ASYNC110 -- state of the real server
        await trio.sleep(0.005)


# --- the webhook: a transient inbox error is 503 + Retry-After, never a dead letter -------------


@pytest.mark.parametrize("setting", ["lock_timeout", "statement_timeout"])
async def test_inbox_write_blocked_briefly_is_503_not_a_dead_letter(
    conninfo: str, setting: str,
) -> None:
    async with open_pool(f"{conninfo} options='-c {setting}=50ms'", 2) as pool:
        store = Store(pool, query_timeout_s=5)
        async with trio.open_nursery() as nursery:
            srv = await _start(nursery, store, WebhookConfig(port=0, app_secret=SECRET))
            raw = cloud_body()
            with psycopg.connect(conninfo) as locker:  # the inbox is locked by someone else
                locker.execute("LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")
                r = await _post(srv.url, raw)
            assert (r.status_code, r.headers["retry-after"]) == (503, "5")
            assert r.json() == {"error": "inbox unavailable, retry later"}
            assert srv.accepted == []
            assert sql(conninfo, "SELECT count(*) FROM dead_letters") == [(0,)]
            r = await _post(srv.url, raw)  # the provider's redelivery, once the lock is gone
            assert r.status_code == 200 and r.json()["stored"] == 1
            assert len(srv.accepted) == 1
            nursery.cancel_scope.cancel()


async def _post(url: str, raw: bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"{url}/webhook/cloud-api", content=raw, headers=signed(raw))

