"""The inbox: messages written as they arrive (with the work they make due), dead letters,
and the small reads of start-up and ``/metrics`` (instances, migrations, figures).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import attrs
from psycopg.types.json import Jsonb

from pipeline.store.edge import Statements
from stages.dedupe import batch_ids, stored
from stages.records import InboundMessage, Invalid, Stored


@attrs.frozen
class InstanceRow:
    name: str
    phone_number_id: str
    evolution_instance: str
    settings: dict[str, Any]


def message_json(msg: InboundMessage) -> dict[str, Any]:
    """The inbox copy of a message: enough to rebuild it after a restart."""
    return {
        "instance": msg.instance, "message_id": msg.message_id, "sender": msg.sender,
        "kind": msg.kind, "text": msg.text, "sent_at": msg.sent_at.isoformat(),
        "received_at": msg.received_at.isoformat(), "format": msg.format,
        "sender_name": msg.sender_name, "media_id": msg.media_id, "reply_to": msg.reply_to,
        "origin": msg.origin,
    }


def message_from_json(data: dict[str, Any]) -> InboundMessage:
    """Rebuild a message from its inbox copy (see :func:`message_json`)."""
    return InboundMessage(
        instance=data["instance"], message_id=data["message_id"], sender=data["sender"],
        kind=data["kind"], text=data["text"],
        sent_at=dt.datetime.fromisoformat(data["sent_at"]),
        received_at=dt.datetime.fromisoformat(data["received_at"]), format=data["format"],
        sender_name=data.get("sender_name"), media_id=data.get("media_id"),
        reply_to=data.get("reply_to"), origin=data.get("origin", "inbox"),
    )


#: the advisory lock that takes processes seeding ``instances`` at once in turn
_SEED_LOCK = 0x70697065  # "pipe"


class InboxStatements(Statements):
    """Writes of intake (messages, dead letters) and the small reads of start-up and
    ``/metrics`` (instances, migrations, figures)."""

    async def store_inbound(self, messages: Sequence[InboundMessage],
                           first_due: dt.timedelta = dt.timedelta(0), *,
                           stamp: bool = False) -> list[Stored]:
        """Write messages to the inbox; return each as :class:`Stored`, ``redelivered`` when
        its id was already there (in the batch or stored before).

        One statement for the whole batch; a repeated id only bumps the row's redelivery
        counter. The same statement counts the new rows as pending work of their
        conversations and makes each due ``first_due`` after its oldest new row (the earliest
        its turn can close), opening the conversation of a sender seen for the first time, in
        arrival order, so conversation ids follow the order of the log.

        ``stamp`` (live intake): the new rows' ``received_at`` is the database's clock at the
        write, not the process's. Then the time a burst is decided on and the time a row
        becomes visible come from one clock: a message whose write was slow is simply
        received later (never earlier than a row a claim has already seen), and processes on
        several machines need no synchronised clocks.
        """
        ids = batch_ids(messages)
        fresh = ids.fresh(messages)
        senders: dict[tuple[str, str], InboundMessage] = {}
        for m in fresh:
            senders.setdefault(m.conversation_key, m)
        rows = await self._all(_STORE_INBOUND, {
            "instances": [m.instance for m in fresh], "ids": [m.message_id for m in fresh],
            "senders": [m.sender for m in fresh], "formats": [m.format for m in fresh],
            "received": [m.received_at for m in fresh],
            "messages": [Jsonb(message_json(m)) for m in fresh],
            "repeats": [ids.repeats.get((m.instance, m.message_id), 0) for m in fresh],
            "c_instances": [k[0] for k in senders], "c_senders": [k[1] for k in senders],
            "c_names": [m.sender_name for m in senders.values()],
            "c_at": [m.received_at for m in senders.values()], "first_due": first_due,
            "stamp": stamp,
        })
        return stored(messages, ids, {(r[0], r[1]) for r in rows if r[2]})

    async def dead_letter(self, stage: str, invalid: Invalid, raw: str | None = None) -> None:
        await self._all(
            "INSERT INTO dead_letters (stage, reason, origin, format, raw)"
            " VALUES (%b, %b, %b, %b, %b)",
            (stage, f"{invalid.reason} (at {invalid.where})" if invalid.where else invalid.reason,
             invalid.origin, invalid.format, raw),
        )

    async def applied_migrations(self) -> list[str]:
        """The versions in ``schema_migrations`` (readiness: are they current?)."""
        return [str(v) for v, in await self._all("SELECT version FROM schema_migrations")]

    async def figures(self) -> dict[str, Any]:
        """What ``/metrics`` shows of the database, in one statement: outbox rows by status,
        dead letters, pending inbox rows."""
        (outbox, dead, pending), = await self._all(
            "SELECT (SELECT coalesce(json_object_agg(status, n), '{}'::json) FROM"
            "        (SELECT status, count(*) AS n FROM outbox GROUP BY status) s),"
            " (SELECT count(*) FROM dead_letters),"
            " (SELECT count(*) FROM inbox WHERE status = 'pending')")
        return {"outbox": outbox, "dead_letters": dead, "inbox_pending": pending}

    async def seed_instances(self, rows: Sequence[InstanceRow]) -> None:
        """Make the ``instances`` table match the config (inserted or updated, never deleted).

        Processes starting together do this at once: an advisory lock takes them in turn (a
        concurrent insert of the same instance would otherwise violate the unique phone
        number id, which ``ON CONFLICT (name)`` does not arbitrate)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%b)", (_SEED_LOCK,))
            await conn.execute(
                "INSERT INTO instances (name, phone_number_id, evolution_instance, settings)"
                " SELECT n, nullif(p, ''), nullif(e, ''), s"
                " FROM unnest(%b::text[], %b::text[], %b::text[], %b::jsonb[]) AS t(n, p, e, s)"
                " ON CONFLICT (name) DO UPDATE SET phone_number_id = EXCLUDED.phone_number_id,"
                " evolution_instance = EXCLUDED.evolution_instance, settings = EXCLUDED.settings,"
                " updated_at = now()",
                ([r.name for r in rows], [r.phone_number_id for r in rows],
                 [r.evolution_instance for r in rows], [Jsonb(r.settings) for r in rows]),
            )

    async def load_instances(self) -> list[InstanceRow]:
        rows = await self._all("SELECT name, coalesce(phone_number_id, ''),"
                               " coalesce(evolution_instance, ''), settings FROM instances")
        return [InstanceRow(r[0], r[1], r[2], r[3]) for r in rows]


_STORE_INBOUND = """
WITH given AS (  -- live intake stamps received_at with the database's clock (`stamp`)
    SELECT u.instance, u.id, u.sender, u.format,
           CASE WHEN %(stamp)b THEN clock_timestamp() ELSE u.received END AS received,
           u.message, u.repeats, u.ord
    FROM unnest(%(instances)b::text[], %(ids)b::text[], %(senders)b::text[],
                %(formats)b::text[], %(received)b::timestamptz[], %(messages)b::jsonb[],
                %(repeats)b::int[]) WITH ORDINALITY
         AS u(instance, id, sender, format, received, message, repeats, ord)
), locked AS (  -- first, in id order: statements that write several conversations (this,
                -- a group commit, a renewal) take their locks in one order and never deadlock
    SELECT c.id FROM conversations c
    WHERE (c.instance, c.sender) IN (SELECT instance, sender FROM given) AND c.status = 'open'
    ORDER BY c.id FOR UPDATE
), ins AS (
    INSERT INTO inbox (instance, message_id, sender, format, received_at, message, redeliveries)
    SELECT instance, id, sender, format, received,
           CASE WHEN %(stamp)b THEN jsonb_set(message, '{received_at}', to_jsonb(received))
                ELSE message END, repeats
    FROM given WHERE (SELECT count(*) FROM locked) >= 0 ORDER BY ord
    ON CONFLICT (instance, message_id)
    DO UPDATE SET redeliveries = inbox.redeliveries + 1 + EXCLUDED.redeliveries
    RETURNING instance, message_id, sender, received_at, (xmax = 0) AS inserted
), arrived AS (  -- new pending work per conversation: its count and when it may be due
    SELECT instance, sender, count(*)::int AS n, min(received_at) + %(first_due)b AS due
    FROM ins WHERE inserted GROUP BY instance, sender
), found AS (
    UPDATE conversations c SET pending = c.pending + a.n,
                               due_at = least(coalesce(c.due_at, 'infinity'), a.due)
    FROM arrived a WHERE c.instance = a.instance AND c.sender = a.sender AND c.status = 'open'
    RETURNING c.instance, c.sender
), conv AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at, pending, due_at)
    SELECT c.instance, c.sender, c.name, c.at, coalesce(a.n, 0), a.due
    FROM unnest(%(c_instances)b::text[], %(c_senders)b::text[], %(c_names)b::text[],
                %(c_at)b::timestamptz[]) WITH ORDINALITY AS c(instance, sender, name, at, ord)
    LEFT JOIN arrived a ON a.instance = c.instance AND a.sender = c.sender
    WHERE NOT EXISTS (SELECT 1 FROM conversations o WHERE o.instance = c.instance
                      AND o.sender = c.sender AND o.status = 'open')
    ORDER BY c.ord
    ON CONFLICT (instance, sender) WHERE status = 'open'
    DO UPDATE SET pending = conversations.pending + EXCLUDED.pending,
                  due_at = least(coalesce(conversations.due_at, 'infinity'), EXCLUDED.due_at)
)
SELECT instance, message_id, inserted FROM ins
"""
