"""Versioned schema migrations: ``pipeline/migrations/NNNN_name.sql`` applied in order.

Each file runs in its own transaction together with its row in ``schema_migrations``, under
an advisory lock, so a half-applied migration never exists and two processes migrating at
once apply each file exactly once. Running it again is a no-op.
"""

from __future__ import annotations

import re
from importlib import resources

import attrs

from pipeline.db import Pool

_LOCK_KEY = 7_146_513_202  # arbitrary, constant: "the pipeline's migration lock"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@attrs.frozen
class Migration:
    version: str
    name: str
    sql: str


def available() -> list[Migration]:
    """The migration files shipped with the package, in version order."""
    found = []
    for entry in resources.files("pipeline.migrations").iterdir():
        if match := _NAME.match(entry.name):
            found.append(Migration(match.group(1), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version: {versions}")
    return found


async def migrate(pool: Pool) -> list[str]:
    """Apply what is missing; return the names of the files applied now."""
    applied_now: list[str] = []
    async with pool.connection() as conn:
        for migration in available():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur = await conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,)
                )
                if await cur.fetchone():
                    continue
                await conn.execute(migration.sql.encode())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
            applied_now.append(migration.name)
    return applied_now
