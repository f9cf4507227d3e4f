"""Opening the pipeline's database: embedded cluster or DSN, database, migrations, pool.

This is the one place that decides *which* PostgreSQL the pipeline talks to. With
``database.dsn`` empty it starts the embedded cluster (and stops it again at the end if it
was not running before), creates the database if needed and applies migrations.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from loguru import logger

from pipeline.config import DatabaseConfig
from pipeline.db import DatabaseUnavailable, open_pool
from pipeline.migrate import migrate
from pipeline.pgcluster import Cluster, valid_dbname
from pipeline.store import Store
from pipeline.vclock import io_held

DEFAULT_DBNAME = "pipeline"


def cluster_for(db: DatabaseConfig) -> Cluster:
    return Cluster(db.data_dir, tcp_port=db.tcp_port)


async def create_database(admin_conninfo: str, name: str, *, template: str | None = None,
                          drop_first: bool = False, throwaway: bool = False) -> None:
    """``CREATE DATABASE name`` unless it exists (the name is checked: it is not a parameter).

    A ``throwaway`` database (a replay's) commits without waiting for the disk: a crash can
    only lose the replay, which is rerun anyway, and commits stop costing an fsync each.
    """
    valid_dbname(name)
    async with open_pool(admin_conninfo, 1) as pool, pool.connection() as conn:
        if drop_first:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
        cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if await cur.fetchone() is None:
            sql = f"CREATE DATABASE {name}" + (f" TEMPLATE {valid_dbname(template)}" if template
                                               else "")
            await conn.execute(sql.encode())
        if throwaway:
            await conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off".encode())


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
        async with _pool_store(db, db.dsn) as store:
            yield store
        return
    cluster = cluster_for(db)
    with io_held():
        started = await trio.to_thread.run_sync(cluster.start)
    if started:
        logger.info("embedded postgresql started in {}", cluster.data_dir)
    admin = cluster.conninfo("postgres")
    try:
        await create_database(admin, dbname, drop_first=fresh, throwaway=fresh)
        async with _pool_store(db, cluster.conninfo(dbname)) as store:
            yield store
        if fresh and not keep:
            await drop_database(admin, dbname)
    finally:
        if started:
            with trio.CancelScope(shield=True), io_held():
                await trio.to_thread.run_sync(cluster.stop)
            logger.info("embedded postgresql stopped")


@asynccontextmanager
async def _pool_store(db: DatabaseConfig, conninfo: str) -> AsyncIterator[Store]:
    async with open_pool(conninfo, db.pool_size, connect_timeout_s=db.connect_timeout_s) as pool:
        store = Store(pool, db.query_timeout_s)
        try:
            await store.ping()
        except DatabaseUnavailable as exc:
            raise DatabaseUnavailable(f"{exc} (check database.dsn)") from None
        if db.migrate_on_start:
            applied = await migrate(pool)
            if applied:
                logger.info("applied migrations: {}", ", ".join(applied))
        yield store
