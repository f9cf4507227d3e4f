"""Schema: migrations apply once, and the constraints that carry correctness hold."""

from __future__ import annotations

import psycopg
import pytest
from conftest import sql

from pipeline.db import open_pool
from pipeline.migrate import available, migrate
from pipeline.pgcluster import Cluster


@pytest.fixture
def empty_db(cluster: Cluster) -> str:
    name = "t_empty_migrate"
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    return cluster.conninfo(name)


async def test_migrate_from_empty_then_again_is_a_no_op(empty_db: str) -> None:
    async with open_pool(empty_db, 2) as pool:
        first = await migrate(pool)
        second = await migrate(pool)
    assert first == [m.name for m in available()]
    assert second == []
    versions = sql(empty_db, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in available()]


def _conversation(db: str, sender: str = "551199") -> int:
    sql(db, "INSERT INTO instances (name) VALUES ('acme') ON CONFLICT DO NOTHING")
    rows = sql(db, "INSERT INTO conversations (instance, sender) VALUES ('acme', %s) "
               "RETURNING id", (sender,))
    return int(rows[0][0])  # type: ignore[call-overload]


def test_one_inbox_row_per_instance_and_message_id(conninfo: str) -> None:
    insert = ("INSERT INTO inbox (instance, message_id, sender, format, received_at, message)"
              " VALUES (%s, 'wamid.1', 's', 'cloud-api', now(), '{}')")
    sql(conninfo, insert, ("acme",))
    sql(conninfo, insert, ("other",))  # same id, other instance: fine
    with pytest.raises(psycopg.errors.UniqueViolation, match="inbox_one_per_message"):
        sql(conninfo, insert, ("acme",))


def test_one_open_conversation_per_instance_and_sender(conninfo: str) -> None:
    first = _conversation(conninfo)
    with pytest.raises(psycopg.errors.UniqueViolation, match="conversations_one_open"):
        _conversation(conninfo)
    sql(conninfo, "UPDATE conversations SET status = 'closed' WHERE id = %s", (first,))
    assert _conversation(conninfo) != first  # a new one once the old one is closed


def test_one_open_escalation_per_conversation(conninfo: str) -> None:
    conv = _conversation(conninfo)
    insert = "INSERT INTO escalations (conversation_id, reason) VALUES (%s, 'keyword')"
    sql(conninfo, insert, (conv,))
    with pytest.raises(psycopg.errors.UniqueViolation, match="escalations_one_open"):
        sql(conninfo, insert, (conv,))
    sql(conninfo, "UPDATE escalations SET status = 'resolved', resolved_at = now()")
    sql(conninfo, insert, (conv,))


def test_outbox_idempotency_key_is_unique(conninfo: str) -> None:
    insert = ("INSERT INTO outbox (idempotency_key, kind, instance, target, payload)"
              " VALUES ('t_1:reply', 'reply', 'acme', '5511', '{}')")
    sql(conninfo, insert)
    with pytest.raises(psycopg.errors.UniqueViolation, match="outbox_idempotent"):
        sql(conninfo, insert)


def test_processed_inbox_rows_carry_an_action(conninfo: str) -> None:
    sql(conninfo, "INSERT INTO inbox (instance, message_id, sender, format, received_at, message)"
        " VALUES ('acme', 'm', 's', 'evolution', now(), '{}')")
    with pytest.raises(psycopg.errors.CheckViolation, match="inbox_processed_has_action"):
        sql(conninfo, "UPDATE inbox SET status = 'processed'")
