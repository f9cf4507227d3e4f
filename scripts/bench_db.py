"""Benchmark three ways for Trio code to reach PostgreSQL, side by side in one run.

The same workload goes through each mechanism, with the same pool size and autocommit on:

(a) psycopg ``AsyncConnection`` through trio-asyncio (``trio_asyncio.open_loop()`` +
    ``aio_as_trio``), pooled by ``psycopg_pool.AsyncConnectionPool`` (or, with
    ``--aio-pool simple`` or when psycopg-pool is not installed, by a small asyncio-side pool:
    an ``asyncio.Queue`` of connections);
(b) sync psycopg ``Connection`` through ``trio.to_thread.run_sync``, limited by a
    ``trio.CapacityLimiter(pool_size)``, with a thread-safe queue of sync connections;
(c) our native Trio wait: ``pipeline.db.open_pool``.

One operation is the shape of the message path: check out a connection, one SELECT by
primary key on a table of 10,000 rows, one ``INSERT ... ON CONFLICT DO NOTHING``; two
queries. For each mechanism and number of concurrent tasks (1, 10, 200 by default) the script
measures queries/s, p50/p99 latency per operation and the CPU this process spent (all its
threads, ``time.process_time``) per 1,000 queries. Cells are interleaved, the mechanism order
rotated on each repetition, and the medians over ``--repeat`` repetitions are printed as a
Markdown table, with ratios against (c).

The cancellation storm (run at the end unless ``--no-storm``; ``--storm`` runs only it):
200 tasks x 50 operations, each under a random 1-150 ms ``trio.move_on_after`` deadline, on
(c) and (a); then 200 follow-up operations must succeed ("recovered N/200"). Every phase has
a time limit, so a wedged pool is reported instead of hanging the script.

The server is a throwaway embedded cluster (``pipeline.pgcluster``, fsync off) in a temporary
directory, stopped and removed at the end even on error or Ctrl-C; or ``--dsn`` (tables
``bench_db_items`` and ``bench_db_events`` are created there and dropped at the end).

Run::

    cd /work/main && PYTHONPATH=. .venv/bin/python scripts/bench_db.py
    PYTHONPATH=. .venv/bin/python scripts/bench_db.py --ops 4000 --repeat 5 --json /tmp/db.json
    PYTHONPATH=. .venv/bin/python scripts/bench_db.py --storm --aio-pool simple

psycopg-pool is a benchmark-only dependency (``.venv/bin/pip install psycopg-pool``).
"""

from __future__ import annotations

# trio_asyncio must be imported before psycopg is imported anywhere (pipeline.db imports it):
# psycopg binds asyncio.get_running_loop at import time, and trio_asyncio replaces it. In the
# other order every connect fails with "no running event loop".
import trio_asyncio

# isort: split
import argparse
import asyncio
import functools
import itertools
import json
import os
import platform
import queue
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg import pq

from pipeline.db import open_pool
from pipeline.pgcluster import throwaway_cluster

try:
    import psycopg_pool
except ImportError:  # benchmark-only dependency; (a) falls back to the simple asyncio pool
    psycopg_pool = None  # type: ignore[assignment]

ITEMS = 10_000
QUERIES_PER_OP = 2
SELECT_SQL = "SELECT id, payload FROM bench_db_items WHERE id = %s"
INSERT_SQL = (
    "INSERT INTO bench_db_events (id, item_id) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING"
)
SETUP_SQL = (
    "DROP TABLE IF EXISTS bench_db_items, bench_db_events",
    "CREATE TABLE bench_db_items (id integer PRIMARY KEY, payload text NOT NULL)",
    (
        "CREATE TABLE bench_db_events (id bigint PRIMARY KEY, item_id integer NOT NULL,"
        " received_at timestamptz NOT NULL DEFAULT now())"
    ),
    f"INSERT INTO bench_db_items SELECT g, md5(g::text) FROM generate_series(1, {ITEMS}) g",
    "ANALYZE bench_db_items",
)
TEARDOWN_SQL = "DROP TABLE IF EXISTS bench_db_items, bench_db_events"

STORM_TASKS = 200
STORM_OPS_EACH = 50
STORM_DEADLINE_S = (0.001, 0.150)
STORM_FOLLOWUPS = 200
STORM_PHASE_LIMIT_S = 30.0  # the storm itself; beyond this the pool counts as wedged
FOLLOWUP_LIMIT_S = 10.0  # all follow-up operations together
CLOSE_LIMIT_S = 10.0  # closing a pool (a wedged one too)

Op = Callable[[int, int], Awaitable[None]]
"""One operation: ``await op(item_id, event_id)``."""


@dataclass
class Opened:
    """A mechanism's pool, ready: the operation to run and a one-line description of its state."""

    op: Op
    state: Callable[[], str] = lambda: ""


@dataclass(frozen=True)
class Mechanism:
    key: str
    label: str
    open: Callable[[str, int], AbstractAsyncContextManager[Opened]]  # (conninfo, pool size)


_event_ids = itertools.count(1)


def next_op_args() -> tuple[int, int]:
    return random.randint(1, ITEMS), next(_event_ids)


# --- (a) trio-asyncio + psycopg AsyncConnection ------------------------------------------


async def _aio_run_op(pool: Any, item_id: int, event_id: int) -> None:
    """asyncio side of one operation (both psycopg_pool and SimpleAioPool have connection())."""
    async with pool.connection() as conn:
        cur = await conn.execute(SELECT_SQL, (item_id,))
        await cur.fetchone()
        await conn.execute(INSERT_SQL, (event_id, item_id))


class SimpleAioPool:
    """An asyncio-side pool: a queue of ``size`` slots, each a connection or None (reconnect).

    A connection that is not idle when given back (cancelled mid-query, broken) is closed and
    its slot reconnects on next use.
    """

    def __init__(self, conninfo: str, size: int) -> None:
        self._conninfo = conninfo
        self._slots: asyncio.Queue[psycopg.AsyncConnection[Any] | None] = asyncio.Queue()
        for _ in range(size):
            self._slots.put_nowait(None)
        self.replaced = 0

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        conn = await self._slots.get()
        try:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            yield conn
        finally:
            self._slots.put_nowait(self._reusable(conn))

    def _reusable(
        self, conn: psycopg.AsyncConnection[Any] | None
    ) -> psycopg.AsyncConnection[Any] | None:
        if conn is None:
            return None
        if conn.closed or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            self.replaced += 1
            conn.pgconn.finish()
            return None
        return conn

    def describe(self) -> str:
        return f"connections replaced {self.replaced}, idle slots {self._slots.qsize()}"

    def close(self) -> None:
        while not self._slots.empty():
            conn = self._slots.get_nowait()
            if conn is not None:
                conn.pgconn.finish()


async def _aio_open_psycopg_pool(conninfo: str, size: int) -> Any:
    pool = psycopg_pool.AsyncConnectionPool(
        conninfo, min_size=size, max_size=size, open=False, kwargs={"autocommit": True}
    )
    await pool.open(wait=True, timeout=30)
    return pool


def _psycopg_pool_state(pool: Any) -> str:
    stats = pool.get_stats()
    keys = ("pool_size", "pool_available", "requests_waiting", "connections_lost")
    return ", ".join(f"{k} {stats.get(k, 0)}" for k in keys)


@asynccontextmanager
async def open_trio_asyncio(conninfo: str, size: int, kind: str) -> AsyncIterator[Opened]:
    async with trio_asyncio.open_loop():
        if kind == "psycopg_pool":
            pool = await trio_asyncio.aio_as_trio(_aio_open_psycopg_pool)(conninfo, size)
            state: Callable[[], str] = functools.partial(_psycopg_pool_state, pool)
        else:
            pool = SimpleAioPool(conninfo, size)
            state = pool.describe
        run_op = trio_asyncio.aio_as_trio(_aio_run_op)

        async def op(item_id: int, event_id: int) -> None:
            await run_op(pool, item_id, event_id)

        try:
            yield Opened(op, state)
        finally:
            with trio.move_on_after(CLOSE_LIMIT_S) as scope:
                scope.shield = True
                if kind == "psycopg_pool":
                    await trio_asyncio.aio_as_trio(pool.close)(timeout=CLOSE_LIMIT_S / 2)
                else:
                    pool.close()
            if scope.cancelled_caught:
                print(f"  (a) pool did not close within {CLOSE_LIMIT_S:.0f} s", file=sys.stderr)


# --- (b) sync psycopg in threads -----------------------------------------------------------


class SyncPool:
    """``size`` sync connections in a thread-safe queue.

    The CapacityLimiter of the same size in front of it means ``get`` never has to wait.
    """

    def __init__(self, conns: Sequence[psycopg.Connection[Any]]) -> None:
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        for conn in conns:
            self._idle.put(conn)
        self._all = list(conns)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._idle.get()
        try:
            yield conn
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        for conn in self._all:
            conn.close()


def _sync_run_op(pool: SyncPool, item_id: int, event_id: int) -> None:
    with pool.connection() as conn:
        conn.execute(SELECT_SQL, (item_id,)).fetchone()
        conn.execute(INSERT_SQL, (event_id, item_id))


def _sync_connect_all(conninfo: str, size: int) -> list[psycopg.Connection[Any]]:
    return [psycopg.connect(conninfo, autocommit=True) for _ in range(size)]


@asynccontextmanager
async def open_threads(conninfo: str, size: int) -> AsyncIterator[Opened]:
    limiter = trio.CapacityLimiter(size)
    pool = SyncPool(await trio.to_thread.run_sync(_sync_connect_all, conninfo, size))

    async def op(item_id: int, event_id: int) -> None:
        await trio.to_thread.run_sync(_sync_run_op, pool, item_id, event_id, limiter=limiter)

    try:
        yield Opened(op)
    finally:
        pool.close()


# --- (c) native Trio wait --------------------------------------------------------------------


@asynccontextmanager
async def open_native(conninfo: str, size: int) -> AsyncIterator[Opened]:
    async with open_pool(conninfo, size) as pool:

        async def op(item_id: int, event_id: int) -> None:
            async with pool.connection() as conn:
                cur = await conn.execute(SELECT_SQL, (item_id,))
                await cur.fetchone()
                await conn.execute(INSERT_SQL, (event_id, item_id))

        def state() -> str:
            s = pool.stats
            return f"opened {s.opened}, discarded {s.discarded}, peak in use {s.peak_in_use}"

        yield Opened(op, state)


def mechanisms(aio_pool: str) -> list[Mechanism]:
    aio_label = "AsyncConnectionPool" if aio_pool == "psycopg_pool" else "simple asyncio pool"

    def open_a(conninfo: str, size: int) -> AbstractAsyncContextManager[Opened]:
        return open_trio_asyncio(conninfo, size, aio_pool)

    return [
        Mechanism("a", f"(a) trio-asyncio + {aio_label}", open_a),
        Mechanism("b", "(b) to_thread + sync pool", open_threads),
        Mechanism("c", "(c) native Trio wait + own pool", open_native),
    ]


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    mechanism: str
    concurrency: int
    repetition: int
    ops: int
    seconds: float
    queries_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1k_queries: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_ops(op: Op, concurrency: int, total_ops: int, latencies: list[float]) -> None:
    """``concurrency`` tasks, each running its share of ``total_ops`` operations in a loop."""

    async def worker(count: int) -> None:
        for _ in range(count):
            item_id, event_id = next_op_args()
            start = time.perf_counter()
            await op(item_id, event_id)
            latencies.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for count in split(total_ops, concurrency):
            nursery.start_soon(worker, count)


async def measure_cell(
    mech: Mechanism, conninfo: str, pool_size: int, concurrency: int, ops: int, rep: int
) -> Cell:
    async with mech.open(conninfo, pool_size) as opened:
        await run_ops(opened.op, pool_size, pool_size * 8, [])  # connect + prepare; not timed
        latencies: list[float] = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run_ops(opened.op, concurrency, ops, latencies)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    latencies.sort()
    queries = ops * QUERIES_PER_OP
    return Cell(
        mechanism=mech.key,
        concurrency=concurrency,
        repetition=rep,
        ops=ops,
        seconds=wall,
        queries_per_s=queries / wall,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        cpu_ms_per_1k_queries=cpu * 1000 / (queries / 1000),
    )


async def run_throughput(
    mechs: list[Mechanism], conninfo: str, args: argparse.Namespace
) -> list[Cell]:
    cells: list[Cell] = []
    for rep in range(args.repeat):
        shift = rep % len(mechs)
        order = mechs[shift:] + mechs[:shift]
        for concurrency in args.concurrency:
            for mech in order:
                cell = await measure_cell(mech, conninfo, args.pool_size, concurrency,
                                          args.ops, rep)
                cells.append(cell)
                log(f"rep {rep + 1}/{args.repeat} {mech.label:<42} {concurrency:>4} tasks: "
                    f"{cell.queries_per_s:8,.0f} q/s  p50 {cell.p50_ms:6.1f} ms  "
                    f"p99 {cell.p99_ms:6.1f} ms  cpu {cell.cpu_ms_per_1k_queries:5.0f} ms/1k q")
    return cells


@dataclass(frozen=True)
class Summary:
    mechanism: str
    concurrency: int
    queries_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1k_queries: float


def summarize(cells: list[Cell]) -> dict[tuple[str, int], Summary]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.mechanism, cell.concurrency), []).append(cell)

    def med(group: list[Cell], name: str) -> float:
        return float(statistics.median(getattr(c, name) for c in group))

    return {
        key: Summary(key[0], key[1], med(g, "queries_per_s"), med(g, "p50_ms"), med(g, "p99_ms"),
                     med(g, "cpu_ms_per_1k_queries"))
        for key, g in groups.items()
    }


# --- cancellation storm ----------------------------------------------------------------------


@dataclass
class StormResult:
    mechanism: str
    ops: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    storm_seconds: float = 0.0
    storm_wedged: bool = False
    recovered: int = 0
    followups: int = STORM_FOLLOWUPS
    followup_errors: dict[str, int] = field(default_factory=dict)
    followup_timed_out: bool = False
    pool_state: str = ""
    close_seconds: float = 0.0


async def storm_phase(op: Op, result: StormResult) -> None:
    outcomes: Counter[str] = Counter()

    async def storm_task() -> None:
        for _ in range(STORM_OPS_EACH):
            item_id, event_id = next_op_args()
            with trio.move_on_after(random.uniform(*STORM_DEADLINE_S)) as scope:
                try:
                    await op(item_id, event_id)
                except Exception as exc:  # counted: this is what the storm probes
                    outcomes[type(exc).__name__] += 1
                    continue
            outcomes["cancelled" if scope.cancelled_caught else "completed"] += 1

    start = time.perf_counter()
    with trio.move_on_after(STORM_PHASE_LIMIT_S) as guard:
        async with trio.open_nursery() as nursery:
            for _ in range(STORM_TASKS):
                nursery.start_soon(storm_task)
    result.storm_seconds = time.perf_counter() - start
    result.storm_wedged = guard.cancelled_caught
    result.ops = STORM_TASKS * STORM_OPS_EACH
    result.outcomes = dict(outcomes)


async def followup_phase(op: Op, result: StormResult) -> None:
    errors: Counter[str] = Counter()
    ok = 0

    async def followup() -> None:
        nonlocal ok
        try:
            await op(*next_op_args())
            ok += 1
        except Exception as exc:  # counted: "recovered" is the measure
            errors[type(exc).__name__] += 1

    with trio.move_on_after(FOLLOWUP_LIMIT_S) as guard:
        async with trio.open_nursery() as nursery:
            for _ in range(STORM_FOLLOWUPS):
                nursery.start_soon(followup)
    result.recovered = ok
    result.followup_errors = dict(errors)
    result.followup_timed_out = guard.cancelled_caught


async def run_storm(mech: Mechanism, conninfo: str, pool_size: int) -> StormResult:
    result = StormResult(mech.label)
    log(f"storm: {mech.label} ...")
    closing = 0.0
    async with mech.open(conninfo, pool_size) as opened:
        await run_ops(opened.op, pool_size, pool_size * 8, [])
        await storm_phase(opened.op, result)
        await followup_phase(opened.op, result)
        result.pool_state = opened.state()
        closing = time.perf_counter()
    result.close_seconds = time.perf_counter() - closing
    log(f"  {format_storm(result)}")
    return result


def format_storm(r: StormResult) -> str:
    outcomes = ", ".join(f"{n} {k}" for k, n in sorted(r.outcomes.items()))
    line = (f"{r.mechanism}: {r.ops} ops under 1-150 ms deadlines in {r.storm_seconds:.1f} s "
            f"({outcomes}){' WEDGED (storm hit its time limit)' if r.storm_wedged else ''}; "
            f"recovered {r.recovered}/{r.followups}")
    if r.followup_timed_out:
        line += f" (follow-ups cut off after {FOLLOWUP_LIMIT_S:.0f} s)"
    if r.followup_errors:
        line += " errors: " + ", ".join(f"{n} {k}" for k, n in r.followup_errors.items())
    if r.pool_state:
        line += f"; pool: {r.pool_state}"
    if r.close_seconds > 1:
        line += f"; closing the pool took {r.close_seconds:.1f} s"
    return line


# --- report ------------------------------------------------------------------------------------


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def table(mechs: list[Mechanism], summary: dict[tuple[str, int], Summary],
          concurrencies: list[int]) -> str:
    lines = [
        (
            "| mechanism | tasks | queries/s | p50 ms | p99 ms | client CPU ms / 1k queries "
            "| q/s vs (c) | p99 vs (c) | CPU vs (c) |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mech in mechs:
        for conc in concurrencies:
            s, base = summary[(mech.key, conc)], summary.get(("c", conc))
            ratios = (
                [ratio(s.queries_per_s, base.queries_per_s), ratio(s.p99_ms, base.p99_ms),
                 ratio(s.cpu_ms_per_1k_queries, base.cpu_ms_per_1k_queries)]
                if base else ["-"] * 3
            )
            lines.append(
                f"| {mech.label} | {conc} | {s.queries_per_s:,.0f} | {s.p50_ms:.1f} "
                f"| {s.p99_ms:.1f} | {s.cpu_ms_per_1k_queries:.0f} | " + " | ".join(ratios) + " |"
            )
    return "\n".join(lines)


def fastest_line(mechs: list[Mechanism], summary: dict[tuple[str, int], Summary],
                 concurrency: int) -> str:
    ranked = sorted(mechs, key=lambda m: summary[(m.key, concurrency)].queries_per_s,
                    reverse=True)
    best = summary[(ranked[0].key, concurrency)].queries_per_s
    others = ", ".join(
        f"{best / summary[(m.key, concurrency)].queries_per_s:.1f}x {m.label.split()[0]}"
        for m in ranked[1:]
    )
    return (f"Fastest at {concurrency} tasks: {ranked[0].label} "
            f"({best:,.0f} queries/s; {others})")


def header(args: argparse.Namespace, server: str) -> str:
    cells = "" if args.storm else (
        f"{args.ops} ops per cell, medians of {args.repeat} interleaved repetitions; "
    )
    return (
        f"DB access benchmark: pool size {args.pool_size}, one op = checkout + SELECT by "
        f"primary key on {ITEMS:,} rows + INSERT ... ON CONFLICT DO NOTHING "
        f"({QUERIES_PER_OP} queries); {cells}{server}; "
        f"Python {platform.python_version()}, trio {trio.__version__}, "
        f"trio-asyncio {trio_asyncio.__version__}, psycopg {psycopg.__version__}"
        + (f", psycopg-pool {psycopg_pool.__version__}" if psycopg_pool else "")
        + f", {os.cpu_count()} CPUs"
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- server and setup ------------------------------------------------------------------------


@contextmanager
def database(dsn: str | None) -> Iterator[tuple[str, str]]:
    """(conninfo, description) of ``dsn`` or of a throwaway embedded cluster."""
    if dsn:
        yield dsn, "server from --dsn"
        return
    with throwaway_cluster("bench_db_") as cluster:
        log(f"started a throwaway cluster in {cluster.data_dir}")
        version = (cluster.data_dir / "PG_VERSION").read_text().strip()
        yield cluster.conninfo("postgres"), f"embedded PostgreSQL {version} (fsync off)"


@contextmanager
def bench_tables(conninfo: str) -> Iterator[None]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for sql in SETUP_SQL:
            conn.execute(sql)
    try:
        yield
    finally:
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(TEARDOWN_SQL)
        except psycopg.Error as exc:
            log(f"could not drop the benchmark tables: {exc}")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=4000, help="operations per cell")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--concurrency", default="1,10,200",
                        type=lambda s: [int(x) for x in s.split(",")],
                        help="comma-separated numbers of concurrent tasks")
    parser.add_argument("--dsn", help="use this server instead of a throwaway cluster "
                        "(a socket directory or IP address: (c) does not resolve host names)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--aio-pool", choices=["psycopg_pool", "simple"],
                        default="psycopg_pool" if psycopg_pool else "simple",
                        help="pool for (a); default psycopg_pool when installed")
    storm = parser.add_mutually_exclusive_group()
    storm.add_argument("--storm", action="store_true", help="run only the cancellation storm")
    storm.add_argument("--no-storm", action="store_true", help="skip the cancellation storm")
    args = parser.parse_args(argv)
    if args.aio_pool == "psycopg_pool" and psycopg_pool is None:
        parser.error("psycopg-pool is not installed: pip install psycopg-pool, "
                     "or use --aio-pool simple")
    return args


async def run_all(conninfo: str, args: argparse.Namespace) -> dict[str, Any]:
    mechs = mechanisms(args.aio_pool)
    cells = [] if args.storm else await run_throughput(mechs, conninfo, args)
    storms = []
    if not args.no_storm:
        by_key = {m.key: m for m in mechs}
        storms = [await run_storm(by_key[k], conninfo, args.pool_size) for k in ("c", "a")]
    return {"mechanisms": mechs, "cells": cells, "storms": storms}


def report(args: argparse.Namespace, server: str, results: dict[str, Any]) -> None:
    mechs: list[Mechanism] = results["mechanisms"]
    cells: list[Cell] = results["cells"]
    storms: list[StormResult] = results["storms"]
    print(header(args, server))
    summary = summarize(cells)
    if cells:
        print()
        print(table(mechs, summary, args.concurrency))
        print()
    for storm in storms:
        print(f"Storm {format_storm(storm)}")
    if cells:
        top = 200 if 200 in args.concurrency else max(args.concurrency)
        print(fastest_line(mechs, summary, top))
    if args.json:
        payload = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "server": server,
            "header": header(args, server),
            "mechanisms": {m.key: m.label for m in mechs},
            "medians": [asdict(s) for s in summary.values()],
            "cells": [asdict(c) for c in cells],
            "storms": [asdict(s) for s in storms],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"wrote {args.json}")


def was_interrupted(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with database(args.dsn) as (conninfo, server), bench_tables(conninfo):
            results = trio.run(run_all, conninfo, args)
    except BaseException as exc:
        if not was_interrupted(exc):
            raise
        log("interrupted (the throwaway cluster, if any, was stopped and removed)")
        return 130
    report(args, server, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
