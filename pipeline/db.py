"""How Trio reaches PostgreSQL: psycopg driven by native Trio waits, and a small Trio pool.

psycopg's async API is built for asyncio. Its I/O is written as non-blocking generators that
yield "wait for readable/writable" requests; :class:`TrioConnection` overrides the two places
that consume them (``wait`` and the connect path) with ``trio.lowlevel.wait_readable`` /
``wait_writable``. Measured on this machine (``scripts/bench_db.py``, table in the README)
it does 3-5x the queries/s of trio-asyncio and 1.3-2.4x those of a thread pool, at a
third to a fifth of their client CPU per query. It relies on private psycopg API
(``wait``, ``_connect_gen``, ``_cancel_gen``, ``_should_cancel``), hence the pin to
``psycopg>=3.3.9,<3.4`` and the tests in ``tests/test_db.py``.

Rules that keep it correct:

* A connection is never shared between tasks (psycopg's internal lock is an asyncio lock);
  the pool hands each connection to one task at a time.
* On a Trio cancellation in the middle of an operation, the server is told to cancel the
  query and the operation is drained in a shielded scope, so the connection is left idle
  (or in a failed transaction, which the pool rolls back) -- or closed when that does not
  work in time. A broken connection is never handed to the next user.
* Host names are not resolved by Trio: use a Unix socket directory or an IP address.

Nothing outside this module and :mod:`pipeline.store` knows any of this.
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from typing import Any, Self

import attrs
import psycopg
import trio
from psycopg import (
    _queries,  # private: pinned, see the module docstring
    pq,
)
from psycopg._enums import Ready, Wait  # private: pinned, see the module docstring
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow

from pipeline.vclock import io_held

_WAIT_R = Wait.R
_WAIT_W = Wait.W
_READY_R = Ready.R
_READY_W = Ready.W
_READY_NONE = Ready.NONE

#: how long the shielded clean-up after a cancellation may take before the connection is closed
CANCEL_CLEANUP_S = 5.0

# psycopg converts a query's placeholders on every execution when the query is longer than
# 4 kB (its cache skips longer ones); the claim and commit statements are 5-10 kB and run
# thousands of times. Cache them too: measured ~9 % of a replay's client CPU (issue 16).
_queries.MAX_CACHED_STATEMENT_LENGTH = 64 * 1024


class DatabaseError(Exception):
    """Base of the errors this module raises."""


class DatabaseUnavailable(DatabaseError):
    """The server could not be reached or the connection was lost; retry later."""


class PoolClosed(DatabaseError):
    """The pool was closed; no more connections are handed out."""


def _poll(fileno: int, wait: int) -> int:
    rl = [fileno] if wait & _WAIT_R else []
    wl = [fileno] if wait & _WAIT_W else []
    r, w, _ = select.select(rl, wl, [], 0)
    return (_READY_R if r else _READY_NONE) | (_READY_W if w else _READY_NONE)


async def _wait_fd(fileno: int, wait: int) -> int:
    """Wait until ``fileno`` is ready for what libpq asked; return the ready state."""
    if wait == _WAIT_R:
        await trio.lowlevel.wait_readable(fileno)
        return _READY_R
    if wait == _WAIT_W:
        await trio.lowlevel.wait_writable(fileno)
        return _READY_W
    # read *or* write: pipeline mode flushing while results come back
    ready = _poll(fileno, wait)
    if ready:
        await trio.lowlevel.checkpoint()
        return ready
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wake_on, trio.lowlevel.wait_readable, fileno, nursery.cancel_scope)
        nursery.start_soon(_wake_on, trio.lowlevel.wait_writable, fileno, nursery.cancel_scope)
    return _poll(fileno, wait) or _READY_R


async def _wake_on(waiter: Any, fileno: int, scope: trio.CancelScope) -> None:
    await waiter(fileno)
    scope.cancel()


async def _drive(gen: Generator[Any, Any, Any], fileno: int) -> Any:
    """Run a psycopg connection generator (yielding wait states) to completion."""
    try:
        wait = next(gen)
        while True:
            ready = await _wait_fd(fileno, wait)
            wait = gen.send(ready)
    except StopIteration as stop:
        return stop.value
    except OSError as exc:
        raise psycopg.OperationalError("connection socket closed") from exc


async def _drive_conn(gen: Generator[Any, Any, Any]) -> Any:
    """Run a generator that yields ``(fileno, wait)`` pairs (connect and cancel)."""
    try:
        fileno, wait = next(gen)
        while True:
            ready = await _wait_fd(fileno, wait)
            fileno, wait = gen.send(ready)
    except StopIteration as stop:
        return stop.value


class TrioConnection(psycopg.AsyncConnection[TupleRow]):
    """A psycopg async connection whose waits are Trio waits. Never share one between tasks."""

    @classmethod
    async def connect_trio(cls, conninfo: str, *, autocommit: bool = True) -> Self:
        """Connect without touching asyncio (no host-name resolution: use a socket or IP)."""
        with io_held():
            conn: Self = await _drive_conn(cls._connect_gen(make_conninfo(conninfo)))
        conn._autocommit = autocommit
        return conn

    async def wait(self, gen: Any, interval: float = 0.0, timeout: float | None = None) -> Any:
        with io_held():
            try:
                return await _drive(gen, self.pgconn.socket)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._settle_after_cancel(gen)
                raise

    async def _settle_after_cancel(self, gen: Any) -> None:
        """Cancel the query on the server and drain ``gen``, or close the connection."""
        with trio.move_on_after(CANCEL_CLEANUP_S) as scope:
            try:
                active = self.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
                if active and self._should_cancel():
                    await _drive_conn(self._cancel_gen())
                await _drive(gen, self.pgconn.socket)
            except psycopg.errors.QueryCanceled:
                pass
            except (psycopg.Error, OSError):
                self.pgconn.finish()
        if scope.cancelled_caught:
            self.pgconn.finish()


@attrs.define
class PoolStats:
    """Counters a benchmark or a test reads to prove the pool stays within its bound."""

    size: int
    in_use: int = 0
    peak_in_use: int = 0
    opened: int = 0
    discarded: int = 0
    acquires: int = 0


class Pool:
    """A bounded pool of :class:`TrioConnection`.

    ``connection()`` waits (fairly, FIFO) for one of ``size`` slots, reuses an idle connection
    or opens a new one, and on exit -- whatever happened, shielded from cancellation -- checks
    it: broken or closed connections are discarded, an open transaction is rolled back, and
    only a clean idle connection goes back. A lost server therefore costs the users of the
    connections that saw it one clear :class:`DatabaseUnavailable`; the next acquire
    reconnects.
    """

    def __init__(self, conninfo: str, size: int, *, connect_timeout_s: float = 5.0) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, not {size}")
        self._conninfo = conninfo
        self._slots = trio.CapacityLimiter(size)
        self._idle: list[TrioConnection] = []
        self._connect_timeout_s = connect_timeout_s
        self._closed = False
        self.stats = PoolStats(size=size)

    @property
    def conninfo(self) -> str:
        return self._conninfo

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[TrioConnection]:
        """Borrow a connection for the duration of the block."""
        if self._closed:
            raise PoolClosed("the database pool is closed")
        async with self._slots:
            conn = await self._take()
            self._note_acquired()
            try:
                yield conn
            finally:
                self.stats.in_use -= 1
                with trio.CancelScope(shield=True):
                    await self._give_back(conn)

    def _note_acquired(self) -> None:
        stats = self.stats
        stats.acquires += 1
        stats.in_use += 1
        stats.peak_in_use = max(stats.peak_in_use, stats.in_use)

    async def _take(self) -> TrioConnection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.pgconn.status == pq.ConnStatus.OK:
                return conn
            self._discard(conn)
        return await self._open()

    async def _open(self) -> TrioConnection:
        try:
            with trio.fail_after(self._connect_timeout_s):
                conn = await TrioConnection.connect_trio(self._conninfo)
        except trio.TooSlowError:
            raise DatabaseUnavailable(
                f"database did not accept a connection within {self._connect_timeout_s} s"
            ) from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the database: {_first_line(exc)}") from exc
        self.stats.opened += 1
        return conn

    async def _give_back(self, conn: TrioConnection) -> None:
        if self._closed or conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
            self._discard(conn)
            return
        status = conn.pgconn.transaction_status
        if status == pq.TransactionStatus.IDLE or (
            status != pq.TransactionStatus.ACTIVE and await self._rolled_back(conn)
        ):
            self._idle.append(conn)
        else:
            self._discard(conn)

    async def _rolled_back(self, conn: TrioConnection) -> bool:
        with trio.move_on_after(CANCEL_CLEANUP_S):
            try:
                await conn.rollback()
                return conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
            except psycopg.Error:
                return False
        return False

    def _discard(self, conn: TrioConnection) -> None:
        self.stats.discarded += 1
        conn.pgconn.finish()

    async def aclose(self) -> None:
        """Close idle connections now; borrowed ones are closed when given back."""
        self._closed = True
        while self._idle:
            self._idle.pop().pgconn.finish()
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_pool(
    conninfo: str, size: int, *, connect_timeout_s: float = 5.0
) -> AsyncIterator[Pool]:
    """A pool that is closed when the block exits."""
    pool = Pool(conninfo, size, connect_timeout_s=connect_timeout_s)
    try:
        yield pool
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: SQLSTATE classes that mean "the server cannot serve us now": connection exceptions,
#: insufficient resources (e.g. 53300 too many connections), operator intervention (57P01-03
#: shutdown, 57014 a cancellation), system errors
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")

#: SQLSTATEs of a statement the server refused *for now*: the same statement may succeed when
#: run again -- deadlock, serialization failure, lock not available (lock_timeout, NOWAIT), a
#: connection closed for idling in a transaction
_TRANSIENT_STATES = frozenset({"40P01", "40001", "55P03", "25P03"})


def translate(exc: psycopg.Error) -> DatabaseError:
    """Map a psycopg error to this module's errors: the connection or the server being
    unavailable, or the statement refused for now, is worth a retry
    (:class:`DatabaseUnavailable`); a problem with the data or the statement (e.g. an index
    row too large) is not, and stays a :class:`DatabaseError`.

    A cancellation (57014) that arrives here was not ours -- ``statement_timeout``,
    ``pg_cancel_backend``, an operator: our own go through Trio cancel scopes and surface as
    ``trio.Cancelled`` or ``TooSlowError`` (:meth:`TrioConnection.wait`) -- so it is a
    retryable :class:`DatabaseUnavailable` too."""
    state = exc.sqlstate or ""
    if state in _TRANSIENT_STATES or isinstance(exc, psycopg.errors.QueryCanceled):
        return DatabaseUnavailable(f"database refused the statement for now: {_first_line(exc)}")
    if state[:2] in _UNAVAILABLE_CLASSES or (
        not state and isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))
    ):
        return DatabaseUnavailable(f"database connection failed: {_first_line(exc)}")
    return DatabaseError(_first_line(exc))
