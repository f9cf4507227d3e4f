"""The one error edge of every statements class: a pooled connection per statement, under
``query_timeout_s``, psycopg errors translated (STYLE.md, rule 9).

The turn path's :class:`pipeline.store.Store` and the background tasks' stores (outbox,
retention, dead letters, console) all derive from :class:`Statements`, so a timeout or a
lost server reads the same wherever it happens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import trio

from pipeline.db import DatabaseError, DatabaseUnavailable, Pool, translate


class QueryTimeout(DatabaseUnavailable):
    """A statement did not finish within ``database.query_timeout_s``."""


class ClaimConflict(DatabaseError):
    """A commit found its claim taken over or its rows already processed: nothing was
    written, and the work is redone from the database."""


_CONFLICT_STATE = "PC001"  # raised by pipeline_conflict() (migration 0004)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Statements:
    """One statement a call on a pooled connection, under ``query_timeout_s``, psycopg errors
    translated; ``round_trips`` counts them. The base of every store."""

    def __init__(self, pool: Pool, query_timeout_s: float) -> None:
        self.pool = pool
        self.query_timeout_s = query_timeout_s
        self.round_trips = 0

    @asynccontextmanager
    async def _conn(self, timeout: float | None = None
                    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        limit = self.query_timeout_s if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                async with self.pool.connection() as conn:
                    self.round_trips += 1
                    yield conn
        except trio.TooSlowError:
            raise QueryTimeout(f"database did not answer within {limit} s") from None
        except psycopg.Error as exc:
            if exc.sqlstate == _CONFLICT_STATE:
                raise ClaimConflict(_first_line(exc)) from exc
            raise translate(exc) from exc

    async def _all(self, sql: str, params: Any = None,
                   timeout: float | None = None) -> list[tuple[Any, ...]]:
        """Run one statement, prepared on the connection from its first execution: every
        statement here is a constant, and psycopg's default (prepare at the sixth) makes the
        server plan the large claim and commit statements five more times per connection --
        a quarter of the server's time in a short replay (pg_stat_statements, issue 16)."""
        async with self._conn(timeout) as conn:
            cur = await conn.execute(sql, params, prepare=True)
            return await cur.fetchall() if cur.description else []
