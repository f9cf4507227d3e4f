"""Shared fixtures: one throwaway embedded PostgreSQL per test session, and a fresh database
per test cloned from a migrated template (``CREATE DATABASE ... TEMPLATE`` takes ~20 ms)."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import trio

from pipeline.db import Pool, open_pool
from pipeline.migrate import migrate
from pipeline.pgcluster import Cluster, throwaway_cluster
from pipeline.store import Store

TEMPLATE = "pipeline_template"
_numbers = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A private cluster for the whole session (fsync off), removed at the end."""
    with throwaway_cluster("pipeline-test-") as pg:
        trio.run(_make_template, pg)
        yield pg


async def _make_template(pg: Cluster) -> None:
    with psycopg.connect(pg.conninfo(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {TEMPLATE}")
    async with open_pool(pg.conninfo(TEMPLATE), 1) as pool:
        await migrate(pool)


@pytest.fixture
def dbname(cluster: Cluster) -> Iterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"t_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield name
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def conninfo(cluster: Cluster, dbname: str) -> str:
    return cluster.conninfo(dbname)


@pytest.fixture
async def pool(conninfo: str) -> AsyncIterator[Pool]:
    async with open_pool(conninfo, 5) as p:
        yield p


@pytest.fixture
async def store(pool: Pool) -> Store:
    return Store(pool, query_timeout_s=5.0)


def sql(conninfo: str, query: str, params: object = None) -> list[tuple[object, ...]]:
    """Run one statement synchronously (test assertions look at the database this way)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []
