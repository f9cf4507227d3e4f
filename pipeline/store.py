"""The store API: every SQL statement the stages need, each one round trip.

Stages call these methods and never see a connection. Each method borrows a pooled
connection for exactly one statement (no Turn ever holds a connection while it waits for
another), runs under ``query_timeout_s`` and translates psycopg errors into
:class:`pipeline.db.DatabaseError` subclasses. Writes that belong together are one statement
(data-modifying CTEs), so a cancellation can never leave half of them behind.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import psycopg
import trio
from psycopg.types.json import Jsonb

from pipeline.db import DatabaseError, DatabaseUnavailable, Pool, translate
from pipeline.records import Action, InboundMessage, Invalid, Stored, Turn, TurnContext


class QueryTimeout(DatabaseUnavailable):
    """A statement did not finish within ``database.query_timeout_s``."""


@attrs.frozen
class InstanceRow:
    name: str
    phone_number_id: str
    evolution_instance: str
    settings: dict[str, Any]


@attrs.frozen
class EscalationRow:
    id: int
    instance: str
    sender: str
    reason: str
    created_at: dt.datetime


@attrs.frozen
class TurnEffects:
    """Everything a finished Turn writes, committed together by :meth:`Store.commit_turn`."""

    turn: Turn
    action: Action
    reason: str | None
    reply_text: str | None
    outbox: tuple[tuple[str, str, str, dict[str, Any]], ...]  # (key, kind, target, payload)
    delivered: bool


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


def _sender_name(turn: Turn) -> str | None:
    return next((m.sender_name for m in reversed(turn.messages) if m.sender_name), None)


def _turn_params(turn: Turn) -> dict[str, Any]:
    return {
        "instance": turn.instance, "sender": turn.sender, "name": _sender_name(turn),
        "at": turn.messages[-1].received_at, "turn": turn.turn_id,
        "ids": [m.message_id for m in turn.messages], "kinds": [m.kind for m in turn.messages],
        "bodies": [m.text for m in turn.messages], "sent": [m.sent_at for m in turn.messages],
    }


def _context(conv_id: int, history: str | None, webhook_url: str | None, escalated: bool,
             fallbacks: list[bool] | None) -> TurnContext:
    return TurnContext(conversation_id=conv_id, history=history or "",
                       webhook_url=webhook_url or "", escalated=bool(escalated),
                       recent_fallbacks=tuple(fallbacks or ()))


class Store:
    """Small async API over a :class:`Pool`; see the module docstring."""

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
            raise translate(exc) from exc

    async def _all(self, sql: str, params: Any = None,
                   timeout: float | None = None) -> list[tuple[Any, ...]]:
        async with self._conn(timeout) as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []

    async def ping(self) -> None:
        await self._all("SELECT 1")

    async def seed_instances(self, rows: Sequence[InstanceRow]) -> None:
        """Make the ``instances`` table match the config (inserted or updated, never deleted)."""
        await self._all(
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

    async def store_inbound(self, messages: Sequence[InboundMessage]) -> list[Stored]:
        """Write messages to the inbox; return each as :class:`Stored`: whether it was a
        redelivery, and whether its row is still pending (not processed yet).

        One statement for the whole batch; a repeated id (in the batch or already stored)
        only bumps the row's redelivery counter. The same statement opens the conversation
        of a sender seen for the first time, in arrival order, so conversation ids follow
        the order of the log (a replay gives the same ids every time).
        """
        first: dict[tuple[str, str], int] = {}
        repeats: dict[tuple[str, str], int] = {}
        for i, msg in enumerate(messages):
            key = (msg.instance, msg.message_id)
            if key in first:
                repeats[key] = repeats.get(key, 0) + 1
            else:
                first[key] = i
        fresh = [messages[i] for i in first.values()]
        senders: dict[tuple[str, str], InboundMessage] = {}
        for m in fresh:
            senders.setdefault(m.conversation_key, m)
        rows = await self._all(_STORE_INBOUND, {
            "instances": [m.instance for m in fresh], "ids": [m.message_id for m in fresh],
            "senders": [m.sender for m in fresh], "formats": [m.format for m in fresh],
            "received": [m.received_at for m in fresh],
            "messages": [Jsonb(message_json(m)) for m in fresh],
            "repeats": [repeats.get((m.instance, m.message_id), 0) for m in fresh],
            "c_instances": [k[0] for k in senders], "c_senders": [k[1] for k in senders],
            "c_names": [m.sender_name for m in senders.values()],
            "c_at": [m.received_at for m in senders.values()],
        })
        inserted = {(r[0], r[1]) for r in rows if r[2]}
        pending = {(r[0], r[1]) for r in rows if r[3]}
        return [
            Stored(m, redelivered=not (first[(m.instance, m.message_id)] == i
                                       and (m.instance, m.message_id) in inserted),
                   pending=(m.instance, m.message_id) in pending)
            for i, m in enumerate(messages)
        ]

    async def pending(self, after: tuple[dt.datetime, int] | None,
                      limit: int) -> list[tuple[tuple[dt.datetime, int], InboundMessage]]:
        """Inbox rows not processed yet, oldest first, after the cursor ``after``: what a
        restart must still handle."""
        rows = await self._all(
            "SELECT received_at, id, message FROM inbox WHERE status = 'pending'"
            " AND (%b::timestamptz IS NULL OR (received_at, id) > (%b::timestamptz, %b::bigint))"
            " ORDER BY received_at, id LIMIT %s",
            (after[0] if after else None, after[0] if after else None,
             after[1] if after else None, limit),
        )
        return [((r[0], r[1]), message_from_json(r[2])) for r in rows]

    async def dead_letter(self, stage: str, invalid: Invalid, raw: str | None = None) -> None:
        await self._all(
            "INSERT INTO dead_letters (stage, reason, origin, format, raw)"
            " VALUES (%b, %b, %b, %b, %b)",
            (stage, f"{invalid.reason} (at {invalid.where})" if invalid.where else invalid.reason,
             invalid.origin, invalid.format, raw),
        )

    async def mark_processed(self, keys: Sequence[tuple[str, str]], action: str,
                             reason: str | None) -> None:
        """Close inbox rows that end without a Turn (e.g. repeated text)."""
        await self._all(
            "UPDATE inbox SET status = 'processed', action = %b, reason = %b,"
            " processed_at = now() FROM unnest(%b::text[], %b::text[]) AS k(i, m)"
            " WHERE inbox.instance = k.i AND inbox.message_id = k.m AND status = 'pending'",
            (action, reason, [k[0] for k in keys], [k[1] for k in keys]),
        )

    async def load_context(self, turn: Turn, history_chars: int, recent_interactions: int,
                           min_confidence: float = 0.0,
                           timeout: float | None = None) -> TurnContext:
        """Find or create the conversation, load its context and store the user messages.

        One statement: the conversation upsert, the four independent reads (history, webhook
        config, escalation state, recent AI interactions) and the insert of the turn's
        messages. The reads see the snapshot taken before the insert, so the history never
        contains the turn itself.
        """
        rows = await self._all(_LOAD_CONTEXT, {
            **_turn_params(turn), "chars": history_chars, "n": recent_interactions,
            "min_conf": min_confidence,
        }, timeout)
        if not rows:
            raise DatabaseError(f"conversation of {turn.instance}/{turn.sender} not found")
        return _context(*rows[0])

    # --- the context loads one by one (modes sequential and parallel) ----------------------

    async def upsert_conversation(self, turn: Turn, timeout: float | None = None) -> int:
        """Find or create the open conversation of the turn, in one statement (no race
        between two workers: the partial unique index decides)."""
        rows = await self._all(_UPSERT_CONVERSATION, _turn_params(turn), timeout)
        return int(rows[0][0])

    async def load_history(self, conversation_id: int, turn_id: str, chars: int,
                           timeout: float | None = None) -> str:
        rows = await self._all(_HISTORY, {"conv": conversation_id, "turn": turn_id,
                                          "chars": chars}, timeout)
        return str(rows[0][0] or "")

    async def load_webhook(self, instance: str, timeout: float | None = None) -> str:
        rows = await self._all("SELECT settings ->> 'webhook_url' FROM instances WHERE name = %s",
                               (instance,), timeout)
        return str(rows[0][0] or "") if rows else ""

    async def load_escalated(self, conversation_id: int, timeout: float | None = None) -> bool:
        rows = await self._all("SELECT EXISTS (SELECT 1 FROM escalations WHERE"
                               " conversation_id = %b AND status = 'open')",
                               (conversation_id,), timeout)
        return bool(rows[0][0])

    async def load_fallbacks(self, conversation_id: int, turn_id: str, n: int,
                             min_confidence: float = 0.0,
                             timeout: float | None = None) -> tuple[bool, ...]:
        """The last ``n`` answers, newest first: True for a failed one (a fallback, or a
        confidence below ``min_confidence``)."""
        rows = await self._all(_FALLBACKS, {"conv": conversation_id, "turn": turn_id, "n": n,
                                            "min_conf": min_confidence}, timeout)
        return tuple(rows[0][0] or ())

    async def store_user_messages(self, conversation_id: int, turn: Turn,
                                  timeout: float | None = None) -> None:
        await self._all(_STORE_MESSAGES, {"conv": conversation_id, **_turn_params(turn)},
                        timeout)

    async def load_contexts(self, turns: Sequence[Turn], history_chars: int,
                            recent_interactions: int, min_confidence: float = 0.0,
                            timeout: float | None = None) -> list[TurnContext]:
        """:meth:`load_context` for many turns of *different* conversations in one
        statement (mode ``batched``); results in the order of ``turns``."""
        messages = [(t, m) for t in turns for m in t.messages]
        rows = await self._all(_LOAD_CONTEXTS, {
            "instances": [t.instance for t in turns], "senders": [t.sender for t in turns],
            "names": [_sender_name(t) for t in turns],
            "ats": [t.messages[-1].received_at for t in turns],
            "turns": [t.turn_id for t in turns],
            "m_turns": [t.turn_id for t, _ in messages],
            "m_ids": [m.message_id for _, m in messages],
            "m_kinds": [m.kind for _, m in messages], "m_bodies": [m.text for _, m in messages],
            "m_sent": [m.sent_at for _, m in messages],
            "chars": history_chars, "n": recent_interactions, "min_conf": min_confidence,
        }, timeout)
        by_ord = {int(r[0]): r[1:] for r in rows}
        if len(by_ord) != len(turns):
            raise DatabaseError(f"batched context load returned {len(by_ord)} rows for "
                                f"{len(turns)} turns")
        return [_context(*by_ord[i + 1]) for i in range(len(turns))]

    # --- escalations (operators) -----------------------------------------------------------

    async def open_escalations(self, instance: str | None = None) -> list[EscalationRow]:
        """Open escalations, oldest first (optionally of one instance)."""
        rows = await self._all(
            "SELECT e.id, c.instance, c.sender, e.reason, e.created_at"
            " FROM escalations e JOIN conversations c ON c.id = e.conversation_id"
            " WHERE e.status = 'open' AND (%b::text IS NULL OR c.instance = %b)"
            " ORDER BY e.created_at, e.id", (instance, instance))
        return [EscalationRow(*r) for r in rows]

    async def resolve_escalation(self, escalation_id: int, by: str) -> bool:
        """Close an open escalation so the assistant answers again; False if none was open."""
        rows = await self._all(
            "UPDATE escalations SET status = 'resolved', resolved_at = now(), resolved_by = %s"
            " WHERE id = %b AND status = 'open' RETURNING id", (by, escalation_id))
        return bool(rows)

    async def commit_turn(self, fx: TurnEffects) -> None:
        """Write the turn's effects and close its inbox rows, atomically and idempotently."""
        turn = fx.turn
        assert turn.context is not None and turn.decision is not None
        reply = turn.reply
        ids = [m.message_id for m in turn.messages]
        await self._all(_COMMIT_TURN, {
            "conv": turn.context.conversation_id, "instance": turn.instance,
            "turn": turn.turn_id, "prompt": turn.text,
            "has_ai": reply is not None, "responder": reply.responder if reply else "",
            "ai_reply": reply.text if reply else "",
            "confidence": reply.confidence if reply else 0.0,
            "fallback": reply.fallback if reply else False,
            "reply_text": fx.reply_text, "reply_id": f"{turn.turn_id}:reply",
            "escalate": turn.decision.verdict == "escalate", "reason": fx.reason,
            "ob_keys": [o[0] for o in fx.outbox], "ob_kinds": [o[1] for o in fx.outbox],
            "ob_targets": [o[2] for o in fx.outbox],
            "ob_payloads": [Jsonb(o[3]) for o in fx.outbox],
            "ob_status": "delivered" if fx.delivered else "pending",
            "ids": ids, "actions": ["merged"] * (len(ids) - 1) + [fx.action],
        })


_STORE_INBOUND = """
WITH ins AS (
    INSERT INTO inbox (instance, message_id, sender, format, received_at, message, redeliveries)
    SELECT * FROM unnest(%(instances)b::text[], %(ids)b::text[], %(senders)b::text[],
                         %(formats)b::text[], %(received)b::timestamptz[], %(messages)b::jsonb[],
                         %(repeats)b::int[])
    ON CONFLICT (instance, message_id)
    DO UPDATE SET redeliveries = inbox.redeliveries + 1 + EXCLUDED.redeliveries
    RETURNING instance, message_id, (xmax = 0) AS inserted, status = 'pending' AS pending
), conv AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at)
    SELECT c.instance, c.sender, c.name, c.at
    FROM unnest(%(c_instances)b::text[], %(c_senders)b::text[], %(c_names)b::text[],
                %(c_at)b::timestamptz[]) WITH ORDINALITY AS c(instance, sender, name, at, ord)
    WHERE NOT EXISTS (SELECT 1 FROM conversations o WHERE o.instance = c.instance
                      AND o.sender = c.sender AND o.status = 'open')
    ORDER BY c.ord
    ON CONFLICT (instance, sender) WHERE status = 'open' DO NOTHING
)
SELECT instance, message_id, inserted, pending FROM ins
"""

_CONVERSATION_UPSERT_BODY = """
    ON CONFLICT (instance, sender) WHERE status = 'open'
    DO UPDATE SET last_message_at = greatest(conversations.last_message_at,
                                             EXCLUDED.last_message_at),
                  sender_name = coalesce(EXCLUDED.sender_name, conversations.sender_name)
    RETURNING id"""

# find (update) first and insert only when there is nothing to find: an INSERT ... ON
# CONFLICT spends a sequence value even when it conflicts, and conversation ids must not
# depend on how turns interleave (intake opens conversations in log order)
_FIND_OR_CREATE = """
found AS (
    UPDATE conversations SET last_message_at = greatest(last_message_at, %(at)b),
                             sender_name = coalesce(%(name)b, sender_name)
    WHERE instance = %(instance)b AND sender = %(sender)b AND status = 'open'
    RETURNING id
), made AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at)
    SELECT %(instance)b, %(sender)b, %(name)b, %(at)b WHERE NOT EXISTS (SELECT 1 FROM found)
""" + _CONVERSATION_UPSERT_BODY + """
), conv AS (
    SELECT id FROM found UNION ALL SELECT id FROM made
)"""

_UPSERT_CONVERSATION = "WITH" + _FIND_OR_CREATE + " SELECT id FROM conv"

# history: the last `chars` characters of the conversation before this turn
_HISTORY_OF = """
    (SELECT right(string_agg(h.role || ': ' || h.body, E'\n' ORDER BY h.id), %(chars)b)
       FROM (SELECT id, role, body FROM messages
              WHERE conversation_id = {conv} AND turn_id IS DISTINCT FROM {turn}
              ORDER BY id DESC LIMIT 50) h)"""

_FALLBACKS_OF = """
    (SELECT array_agg((a.fallback OR a.confidence < %(min_conf)b) ORDER BY a.id DESC)
       FROM (SELECT id, fallback, confidence FROM ai_interactions
              WHERE conversation_id = {conv} AND turn_id <> {turn}
                AND created_at > coalesce((SELECT max(r.resolved_at) FROM escalations r
                                           WHERE r.conversation_id = {conv}), '-infinity')
              ORDER BY id DESC LIMIT %(n)b) a)"""

_ESCALATED_OF = """
    EXISTS (SELECT 1 FROM escalations e WHERE e.conversation_id = {conv} AND e.status = 'open')"""

_HISTORY = "SELECT" + _HISTORY_OF.format(conv="%(conv)b", turn="%(turn)b")
_FALLBACKS = "SELECT" + _FALLBACKS_OF.format(conv="%(conv)b", turn="%(turn)b")

_STORE_MESSAGES = """
INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id, sent_at)
SELECT %(conv)b, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
FROM unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[], %(sent)b::timestamptz[])
     AS t(id, kind, body, sent)
ON CONFLICT (instance, message_id) DO NOTHING"""

# mode single: everything in one statement. The reads see the snapshot taken before the
# inserts, so the history never contains the turn itself.
_LOAD_CONTEXT = "WITH" + _FIND_OR_CREATE + """, stored AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT conv.id, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
    FROM conv, unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[],
                      %(sent)b::timestamptz[]) AS t(id, kind, body, sent)
    ON CONFLICT (instance, message_id) DO NOTHING
)
SELECT conv.id,""" + _HISTORY_OF.format(conv="conv.id", turn="%(turn)b") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = %(instance)b),""" \
    + _ESCALATED_OF.format(conv="conv.id") + "," \
    + _FALLBACKS_OF.format(conv="conv.id", turn="%(turn)b") + """
FROM conv"""

# mode batched: the same for many turns (one per conversation) in one statement
_LOAD_CONTEXTS = """
WITH input AS (
    SELECT * FROM unnest(%(instances)b::text[], %(senders)b::text[], %(names)b::text[],
                         %(ats)b::timestamptz[], %(turns)b::text[])
             WITH ORDINALITY AS t(instance, sender, name, at, turn, ord)
), found AS (
    UPDATE conversations c SET last_message_at = greatest(c.last_message_at, i.at),
                               sender_name = coalesce(i.name, c.sender_name)
    FROM input i WHERE c.instance = i.instance AND c.sender = i.sender AND c.status = 'open'
    RETURNING c.id, c.instance, c.sender
), made AS (
    INSERT INTO conversations (instance, sender, sender_name, last_message_at)
    SELECT i.instance, i.sender, i.name, i.at FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM found f WHERE f.instance = i.instance
                      AND f.sender = i.sender)
    ORDER BY i.ord""" + _CONVERSATION_UPSERT_BODY + """, instance, sender
), conv AS (
    SELECT id, instance, sender FROM found UNION ALL SELECT id, instance, sender FROM made
), stored AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT conv.id, input.instance, m.id, 'user', m.kind, m.body, m.turn, m.sent
    FROM unnest(%(m_turns)b::text[], %(m_ids)b::text[], %(m_kinds)b::text[],
                %(m_bodies)b::text[], %(m_sent)b::timestamptz[]) AS m(turn, id, kind, body, sent)
    JOIN input ON input.turn = m.turn
    JOIN conv ON conv.instance = input.instance AND conv.sender = input.sender
    ON CONFLICT (instance, message_id) DO NOTHING
)
SELECT input.ord, conv.id,""" + _HISTORY_OF.format(conv="conv.id", turn="input.turn") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = input.instance),""" \
    + _ESCALATED_OF.format(conv="conv.id") + "," \
    + _FALLBACKS_OF.format(conv="conv.id", turn="input.turn") + """
FROM input JOIN conv ON conv.instance = input.instance AND conv.sender = input.sender
"""

_COMMIT_TURN = """
WITH ai AS (
    INSERT INTO ai_interactions (conversation_id, turn_id, responder, prompt, reply, confidence,
                                 fallback)
    SELECT %(conv)b, %(turn)b, %(responder)b, %(prompt)b, %(ai_reply)b, %(confidence)b,
           %(fallback)b
    WHERE %(has_ai)b
    ON CONFLICT (turn_id) DO NOTHING
), said AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id)
    SELECT %(conv)b, %(instance)b, %(reply_id)b, 'assistant', 'text', %(reply_text)b, %(turn)b
    WHERE %(reply_text)b::text IS NOT NULL
    ON CONFLICT (instance, message_id) DO NOTHING
), esc AS (
    INSERT INTO escalations (conversation_id, reason, turn_id)
    SELECT %(conv)b, %(reason)b, %(turn)b
    WHERE %(escalate)b
    ON CONFLICT (conversation_id) WHERE status = 'open' DO NOTHING
), ob AS (
    INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload,
                        status, delivered_at)
    SELECT k, kd, %(instance)b, %(conv)b, tg, p, %(ob_status)b,
           CASE WHEN %(ob_status)b = 'delivered' THEN now() END
    FROM unnest(%(ob_keys)b::text[], %(ob_kinds)b::text[], %(ob_targets)b::text[],
                %(ob_payloads)b::jsonb[]) AS o(k, kd, tg, p)
    ON CONFLICT (idempotency_key) DO NOTHING
)
UPDATE inbox SET status = 'processed', action = a.action, turn_id = %(turn)b,
                 reason = CASE WHEN a.action = 'merged' THEN NULL ELSE %(reason)b END,
                 processed_at = now()
FROM unnest(%(ids)b::text[], %(actions)b::text[]) AS a(id, action)
WHERE inbox.instance = %(instance)b AND inbox.message_id = a.id AND inbox.status = 'pending'
"""
