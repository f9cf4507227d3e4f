"""The Trio-native database mechanism against the real embedded PostgreSQL: cancellation,
cancellation storms, the pool bound and lost connections."""

from __future__ import annotations

import random
import re

import psycopg
import pytest
import trio
import trio.testing
from conftest import sql

from pipeline.db import DatabaseUnavailable, Pool, TrioConnection, open_pool
from pipeline.pgcluster import Cluster


async def test_query_round_trip_and_pipeline_mode(pool: Pool) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT %s::int + 1", (41,))
        assert await cur.fetchone() == (42,)
        async with conn.pipeline():
            one = await conn.execute("SELECT 1")
            two = await conn.execute("SELECT 2")
        assert (await one.fetchone(), await two.fetchone()) == ((1,), (2,))


def _sleepers(conninfo: str) -> int:
    rows = sql(conninfo, "SELECT count(*) FROM pg_stat_activity "
               "WHERE query LIKE 'SELECT pg_sleep%%' AND state = 'active'")
    return int(rows[0][0])  # type: ignore[call-overload]


async def test_move_on_after_stops_the_query_on_the_server(pool: Pool, conninfo: str) -> None:
    async with pool.connection() as conn:
        with trio.move_on_after(0.2) as scope:
            await conn.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        assert _sleepers(conninfo) == 0
        cur = await conn.execute("SELECT 'still usable'")
        assert await cur.fetchone() == ("still usable",)


async def test_nursery_cancel_mid_transaction_leaves_no_rows(pool: Pool, conninfo: str) -> None:
    inserted = trio.Event()

    async def write() -> None:
        async with pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO instances (name) VALUES ('half')")
            inserted.set()
            await conn.execute("SELECT pg_sleep(30)")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await inserted.wait()
        await trio.testing.wait_all_tasks_blocked()  # the sleep is on the server now
        nursery.cancel_scope.cancel()
    assert sql(conninfo, "SELECT count(*) FROM instances") == [(0,)]
    assert pool.stats.in_use == 0
    async with pool.connection() as conn:  # the connection came back clean (or was replaced)
        assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


async def test_cancellation_storm_leaves_the_pool_usable(pool: Pool, conninfo: str) -> None:
    rng = random.Random(7)
    cancelled = 0

    async def worker(n: int) -> None:
        nonlocal cancelled
        for i in range(20):
            with trio.move_on_after(rng.uniform(0.001, 0.05)) as scope:
                async with pool.connection() as conn:
                    await conn.execute(
                        "INSERT INTO instances (name) VALUES (%s) ON CONFLICT DO NOTHING",
                        (f"w{n}-{i}",))
                    await conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0, 0.02),))
            cancelled += scope.cancelled_caught

    async with trio.open_nursery() as nursery:
        for n in range(200):
            nursery.start_soon(worker, n)
    assert cancelled > 100  # the storm really cancelled things mid-flight
    assert pool.stats.in_use == 0 and pool.stats.peak_in_use <= pool.stats.size
    ok = 0

    async def follow_up() -> None:
        nonlocal ok
        async with pool.connection() as conn:
            await (await conn.execute("SELECT 1")).fetchone()
            ok += 1

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(follow_up)
    assert ok == 200
    assert _sleepers(conninfo) == 0


async def test_connections_in_use_never_exceed_the_pool_size(conninfo: str) -> None:
    peak_server = 0
    async with open_pool(conninfo, 3) as pool:
        async def work() -> None:
            nonlocal peak_server
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()")
                row = await cur.fetchone()
                assert row is not None
                peak_server = max(peak_server, row[0])

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(work)
        assert pool.stats.peak_in_use == 3
        assert pool.stats.opened == 3
    assert peak_server <= 3


async def test_lost_connection_is_a_clear_error_then_reconnects(conninfo: str) -> None:
    async with open_pool(conninfo, 1) as pool:
        async with pool.connection() as conn:
            pid = conn.pgconn.backend_pid
        sql(conninfo, "SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        async with pool.connection() as conn:  # the broken one was discarded
            assert conn.pgconn.backend_pid != pid
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        assert pool.stats.discarded == 1


async def test_unreachable_server_says_so(tmp_path: object) -> None:
    async with open_pool("host=/nonexistent-socket-dir port=5432 user=postgres", 1) as pool:
        with pytest.raises(DatabaseUnavailable, match=r"^cannot connect to the database: "):
            async with pool.connection():
                pass


async def test_connect_path_never_touches_asyncio(cluster: Cluster) -> None:
    conn = await TrioConnection.connect_trio(cluster.conninfo())
    try:
        cur = await conn.execute("SHOW server_version")
        row = await cur.fetchone()
        assert row is not None and re.match(r"^\d+", row[0])
    finally:
        await conn.close()
