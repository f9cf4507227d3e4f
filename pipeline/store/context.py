"""The context a turn is decided on: the conversation found or opened, its history, webhook,
escalation state and recent answers.

Its SQL fragments (``HISTORY_OF``, ``ESCALATED_OF``, ``FALLBACKS_OF``) are shared with the
claim, which can load the context of the conversations it leases in the same statement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from pipeline.db import DatabaseError
from pipeline.store.edge import Statements
from stages.records import Turn, TurnContext


@attrs.frozen
class ContextRequest:
    """What a claim that loads the context loads: as ``Store.load_context`` does."""

    history_chars: int
    recent_interactions: int
    min_confidence: float = 0.0


def sender_name(turn: Turn) -> str | None:
    """The sender's latest display name in the turn (it updates the conversation's)."""
    return next((m.sender_name for m in reversed(turn.messages) if m.sender_name), None)


def turn_params(turn: Turn) -> dict[str, Any]:
    """The parameters that find a turn's conversation and store its user messages."""
    return {
        "instance": turn.instance, "sender": turn.sender, "name": sender_name(turn),
        "at": turn.messages[-1].received_at, "turn": turn.turn_id,
        "ids": [m.message_id for m in turn.messages], "kinds": [m.kind for m in turn.messages],
        "bodies": [m.text for m in turn.messages], "sent": [m.sent_at for m in turn.messages],
    }


def turn_context(conv_id: int, history: str | None, webhook_url: str | None,
                 escalated: bool, fallbacks: list[bool] | None) -> TurnContext:
    """A context from the columns the loads (and a claim with its context) return."""
    return TurnContext(conversation_id=conv_id, history=history or "",
                       webhook_url=webhook_url or "", escalated=bool(escalated),
                       recent_fallbacks=tuple(fallbacks or ()))


class ContextStatements(Statements):
    """The context a turn is decided on: load it whole (modes single, batched) or one
    read at a time (modes sequential, parallel)."""

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
            **turn_params(turn), "chars": history_chars, "n": recent_interactions,
            "min_conf": min_confidence,
        }, timeout)
        if not rows:
            raise DatabaseError(f"conversation of {turn.instance}/{turn.sender} not found")
        return turn_context(*rows[0])

    # --- the context loads one by one (modes sequential and parallel) ----------------------

    async def upsert_conversation(self, turn: Turn, timeout: float | None = None) -> int:
        """Find or create the open conversation of the turn, in one statement (no race
        between two workers: the partial unique index decides)."""
        rows = await self._all(_UPSERT_CONVERSATION, turn_params(turn), timeout)
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
        await self._all(_STORE_MESSAGES, {"conv": conversation_id, **turn_params(turn)},
                        timeout)

    async def load_contexts(self, turns: Sequence[Turn], history_chars: int,
                            recent_interactions: int, min_confidence: float = 0.0,
                            timeout: float | None = None) -> list[TurnContext]:
        """:meth:`load_context` for many turns of *different* conversations in one
        statement (mode ``batched``); results in the order of ``turns``."""
        messages = [(t, m) for t in turns for m in t.messages]
        rows = await self._all(_LOAD_CONTEXTS, {
            "instances": [t.instance for t in turns], "senders": [t.sender for t in turns],
            "names": [sender_name(t) for t in turns],
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
        return [turn_context(*by_ord[i + 1]) for i in range(len(turns))]


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
HISTORY_OF = """
    (SELECT right(string_agg(h.role || ': ' || h.body, E'\n' ORDER BY h.id), %(chars)b)
       FROM (SELECT id, role, body FROM messages
              WHERE conversation_id = {conv} AND turn_id IS DISTINCT FROM {turn}
              ORDER BY id DESC LIMIT 50) h)"""

FALLBACKS_OF = """
    (SELECT array_agg((a.fallback OR a.confidence < %(min_conf)b) ORDER BY a.id DESC)
       FROM (SELECT id, fallback, confidence FROM ai_interactions
              WHERE conversation_id = {conv} AND turn_id <> {turn}
                AND created_at > coalesce((SELECT max(r.resolved_at) FROM escalations r
                                           WHERE r.conversation_id = {conv}), '-infinity')
              ORDER BY id DESC LIMIT %(n)b) a)"""

ESCALATED_OF = """
    EXISTS (SELECT 1 FROM escalations e WHERE e.conversation_id = {conv} AND e.status = 'open')"""

_HISTORY = "SELECT" + HISTORY_OF.format(conv="%(conv)b", turn="%(turn)b")
_FALLBACKS = "SELECT" + FALLBACKS_OF.format(conv="%(conv)b", turn="%(turn)b")

_STORE_MESSAGES = """
INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id, sent_at)
SELECT %(conv)b, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
FROM unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[], %(sent)b::timestamptz[])
     AS t(id, kind, body, sent)
ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id"""

# mode single: everything in one statement. The reads see the snapshot taken before the
# inserts, so the history never contains the turn itself.
_LOAD_CONTEXT = "WITH" + _FIND_OR_CREATE + """, stored AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, turn_id,
                          sent_at)
    SELECT conv.id, %(instance)b, t.id, 'user', t.kind, t.body, %(turn)b, t.sent
    FROM conv, unnest(%(ids)b::text[], %(kinds)b::text[], %(bodies)b::text[],
                      %(sent)b::timestamptz[]) AS t(id, kind, body, sent)
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
)
SELECT conv.id,""" + HISTORY_OF.format(conv="conv.id", turn="%(turn)b") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = %(instance)b),""" \
    + ESCALATED_OF.format(conv="conv.id") + "," \
    + FALLBACKS_OF.format(conv="conv.id", turn="%(turn)b") + """
FROM conv"""

# mode batched: the same for many turns (one per conversation) in one statement
_LOAD_CONTEXTS = """
WITH input AS (
    SELECT * FROM unnest(%(instances)b::text[], %(senders)b::text[], %(names)b::text[],
                         %(ats)b::timestamptz[], %(turns)b::text[])
             WITH ORDINALITY AS t(instance, sender, name, at, turn, ord)
), locked AS (  -- in id order, like every statement that writes several conversations
    SELECT c.id FROM conversations c
    WHERE (c.instance, c.sender) IN (SELECT instance, sender FROM input) AND c.status = 'open'
    ORDER BY c.id FOR UPDATE
), found AS (
    UPDATE conversations c SET last_message_at = greatest(c.last_message_at, i.at),
                               sender_name = coalesce(i.name, c.sender_name)
    FROM input i WHERE c.instance = i.instance AND c.sender = i.sender AND c.status = 'open'
      AND (SELECT count(*) FROM locked) >= 0
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
    ON CONFLICT (instance, message_id) DO UPDATE SET turn_id = EXCLUDED.turn_id
    WHERE messages.role = 'user' AND messages.turn_id IS DISTINCT FROM EXCLUDED.turn_id
)
SELECT input.ord, conv.id,""" + HISTORY_OF.format(conv="conv.id", turn="input.turn") + """,
    (SELECT settings ->> 'webhook_url' FROM instances WHERE name = input.instance),""" \
    + ESCALATED_OF.format(conv="conv.id") + "," \
    + FALLBACKS_OF.format(conv="conv.id", turn="input.turn") + """
FROM input JOIN conv ON conv.instance = input.instance AND conv.sender = input.sender
"""
