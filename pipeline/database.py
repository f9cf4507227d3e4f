"""Opening the pipeline's database: embedded cluster or DSN, database, migrations, pool.

This is the one place that decides *which* PostgreSQL the pipeline talks to. With
``database.dsn`` empty it uses the embedded cluster -- shared with any other pipeline process
on the machine, started if needed and stopped by the last of them to leave
(:meth:`Cluster.attach`) -- creates the database if needed and applies migrations.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import trio
from loguru import logger

from pipeline.config import DatabaseConfig
from pipeline.db import DatabaseUnavailable, open_pool, translate
from pipeline.logs import dsn_password
from pipeline.migrate import migrate
from pipeline.pgcluster import Cluster, ClusterError, Use, valid_dbname
from pipeline.store import Store
from pipeline.vclock import io_held

DEFAULT_DBNAME = "pipeline"


def cluster_for(db: DatabaseConfig) -> Cluster:
    """The embedded cluster of ``database.data_dir`` (moved if the server cannot use it there)."""
    return Cluster.configured(db.data_dir, tcp_port=db.tcp_port)


async def create_database(admin_conninfo: str, name: str, *, template: str | None = None,
                          drop_first: bool = False, throwaway: bool = False) -> None:
    """``CREATE DATABASE name`` unless it exists (the name is checked: it is not a parameter).

    A ``throwaway`` database (a replay's) commits without waiting for the disk: a crash can
    only lose the replay, which is rerun anyway, and commits stop costing an fsync each.
    """
    valid_dbname(name)
    sql = f"CREATE DATABASE {name}" + (f" TEMPLATE {valid_dbname(template)}" if template else "")
    async with open_pool(admin_conninfo, 1) as pool, pool.connection() as conn:
        try:
            if drop_first:
                await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if await cur.fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase,
                                         psycopg.errors.UniqueViolation):
                    await conn.execute(sql.encode())  # else another process just made it
            if throwaway:
                await conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off".encode())
        except psycopg.Error as exc:
            raise translate(exc) from exc


async def drop_database(admin_conninfo: str, name: str) -> None:
    async with open_pool(admin_conninfo, 1) as pool, pool.connection() as conn:
        await conn.execute(f"DROP DATABASE IF EXISTS {valid_dbname(name)} WITH (FORCE)".encode())


def fresh_dbname(prefix: str = "replay") -> str:
    return f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}_{os.getpid()}"


@asynccontextmanager
async def open_store(db: DatabaseConfig, *, dbname: str = DEFAULT_DBNAME, fresh: bool = False,
                     keep: bool = True) -> AsyncIterator[Store]:
    """A migrated store. ``fresh`` creates database ``dbname`` anew (embedded only) and,
    unless ``keep``, drops it at the end."""
    if db.dsn:
        async with _pool_store(db, db.dsn, "database.dsn") as store:
            yield store
        return
    with io_held():
        cluster = await trio.to_thread.run_sync(cluster_for, db)
        use = await trio.to_thread.run_sync(cluster.attach)
    if use.started:
        logger.info("embedded postgresql started in {}", cluster.data_dir)
    admin = cluster.conninfo("postgres")
    try:
        await create_database(admin, dbname, drop_first=fresh, throwaway=fresh)
        async with _pool_store(db, cluster.conninfo(dbname),
                               f"embedded postgresql in {cluster.data_dir}") as store:
            yield store
        if fresh and not keep:
            await drop_database(admin, dbname)
    finally:
        with trio.CancelScope(shield=True), io_held():
            await _detach(use)


async def _detach(use: Use) -> None:
    """Leave the shared cluster; a failure to stop it is worth a warning, not the run."""
    try:
        stopped = await trio.to_thread.run_sync(use.detach)
    except ClusterError as exc:
        logger.warning("embedded postgresql was left running: {}", exc)
        return
    if stopped:
        logger.info("embedded postgresql stopped (no other process uses it)")


@asynccontextmanager
async def _pool_store(db: DatabaseConfig, conninfo: str, server: str) -> AsyncIterator[Store]:
    """A store on a pool of ``conninfo``; ``server`` names it when it cannot be reached."""
    async with open_pool(conninfo, db.pool_size, connect_timeout_s=db.connect_timeout_s) as pool:
        store = Store(pool, db.query_timeout_s)
        try:
            await store.ping()
        except DatabaseUnavailable as exc:
            reason = _unreachable_reason(exc, dsn_password(db.dsn))
            raise DatabaseUnavailable(f"{server}: cannot reach the server: {reason}") from None
        if db.migrate_on_start:
            applied = await migrate(pool)
            if applied:
                logger.info("applied migrations: {}", ", ".join(applied))
        yield store


def _unreachable_reason(exc: BaseException, password: str = "") -> str:
    """libpq's first line about a failed connection, without our wrappers or the password."""
    cause = exc.__cause__ if isinstance(exc.__cause__, psycopg.Error) else exc
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    for prefix in ("database connection failed: ", "cannot connect to the database: ",
                   "connection failed: "):
        text = text.removeprefix(prefix)
    return text.replace(password, "***") if password else text
