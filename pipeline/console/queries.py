"""The console's statements: one round trip each, the guards in the statement itself, so
two agents acting at once, a double-clicked button or a resubmitted form never produce two
claims, two replies or a reply to a conversation that was handed back meanwhile."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Literal

import attrs
from psycopg.types.json import Jsonb

from pipeline.console.auth import PHONE
from pipeline.store import Statements

EntryKind = Literal["user", "assistant", "handover", "human", "note", "opened", "resolved"]


@attrs.frozen
class Waiting:
    """One open escalation in the queue."""

    escalation_id: int
    conversation_id: int
    instance: str
    sender: str
    sender_name: str | None
    reason: str
    created_at: dt.datetime
    claimed_by: str | None
    last_message_at: dt.datetime | None


@attrs.frozen
class Entry:
    """One line of a conversation's history. ``delivery``: what became of a reply (outbox
    status, then the channel's receipt), None for what was not sent by the pipeline."""

    at: dt.datetime
    kind: EntryKind
    text: str
    author: str | None = None
    delivery: str | None = None
    problem: str | None = None  # why a reply failed or is being retried


@attrs.frozen
class OpenEscalation:
    id: int
    reason: str
    claimed_by: str | None
    created_at: dt.datetime


@attrs.frozen
class Conversation:
    id: int
    instance: str
    sender: str
    sender_name: str | None
    last_message_at: dt.datetime | None
    escalation: OpenEscalation | None
    entries: tuple[Entry, ...]


Result = Literal["done", "already", "missing", "not escalated", "taken"]


def _when(value: Any) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)


def _entry(row: dict[str, Any]) -> Entry:
    kind = row["kind"]
    if kind == "assistant" and row.get("okind") == "handover":
        kind = "handover"
    delivery = None
    if row.get("status"):
        delivery = row["receipt"] if row["status"] == "delivered" and row.get("receipt") \
            else row["status"]
    problem = row.get("receipt_error") or (row.get("last_error")
                                           if row.get("status") != "delivered" else None)
    return Entry(_when(row["at"]), kind, row["text"] or "", row.get("author"), delivery, problem)


def verdict(found: bool, holder: str | None, wrote: bool, agent: str,
            repeated: bool = False) -> Result:
    """What an action achieved, from what its statement saw (pure, table-tested)."""
    if wrote:
        return "done"
    if repeated:
        return "already"
    if not found:
        return "not escalated"
    return "taken" if holder not in (None, agent, PHONE) else "already"


class ConsoleStore(Statements):
    async def queue(self) -> list[Waiting]:
        """Open escalations, oldest first."""
        rows = await self._all(_QUEUE)
        return [Waiting(*r) for r in rows]

    async def conversation(self, conversation_id: int, limit: int) -> Conversation | None:
        rows = await self._all(_CONVERSATION, {"conv": conversation_id, "limit": limit})
        if not rows:
            return None
        conv_id, instance, sender, name, last_at, esc, entries = rows[0]
        escalation = (OpenEscalation(esc["id"], esc["reason"], esc["claimed_by"],
                                     _when(esc["created_at"])) if esc else None)
        return Conversation(conv_id, instance, sender, name, last_at, escalation,
                            tuple(_entry(e) for e in reversed(entries or [])))

    async def claim(self, conversation_id: int, agent: str, *, take_over: bool) -> Result:
        """Become the agent of the conversation's open escalation (``take_over``: even when
        another agent has it)."""
        (found, holder, wrote), = await self._all(_CLAIM, {
            "conv": conversation_id, "agent": agent, "force": take_over})
        return verdict(found, holder, wrote, agent, repeated=holder == agent)

    async def reply(self, conversation_id: int, agent: str, text: str, key: str, *,
                    sending: Sequence[str]) -> Result:
        """Queue an agent's reply in the outbox (claiming the escalation if nobody has):
        ``key`` is the form's own idempotency key, so a resubmitted form sends nothing twice.
        ``sending``: the instances whose channel sends (the others' rows are recorded as
        delivered, like their assistant replies)."""
        (found, holder, wrote, repeated), = await self._all(_REPLY, {
            "conv": conversation_id, "agent": agent, "text": text, "key": key,
            "payload": Jsonb({"to": None, "text": text, "agent": agent}),
            "sending": list(sending)})
        return verdict(found, holder, wrote, agent, repeated=repeated)

    async def note(self, conversation_id: int, agent: str, text: str) -> Result:
        rows = await self._all(
            "INSERT INTO notes (conversation_id, author, body) SELECT id, %s, %s"
            " FROM conversations WHERE id = %s RETURNING id", (agent, text, conversation_id))
        return "done" if rows else "missing"

    async def resolve(self, conversation_id: int, agent: str) -> Result:
        """Hand the conversation back to the assistant: its failure streak starts afresh
        (failed answers before the resolution no longer count)."""
        (found, holder, wrote), = await self._all(_RESOLVE, {
            "conv": conversation_id, "agent": agent})
        return verdict(found, holder, wrote, agent)


_QUEUE = """
SELECT e.id, c.id, c.instance, c.sender, c.sender_name, e.reason, e.created_at, e.claimed_by,
       c.last_message_at
FROM escalations e JOIN conversations c ON c.id = e.conversation_id
WHERE e.status = 'open'
ORDER BY e.created_at, e.id
"""

_CONVERSATION = """
SELECT c.id, c.instance, c.sender, c.sender_name, c.last_message_at,
    (SELECT json_build_object('id', e.id, 'reason', e.reason, 'claimed_by', e.claimed_by,
                              'created_at', e.created_at)
       FROM escalations e WHERE e.conversation_id = c.id AND e.status = 'open'),
    (SELECT json_agg(x) FROM (
        SELECT * FROM (
            SELECT m.sent_at AS at, 1 AS ord, m.id, m.role AS kind, m.body AS text, m.author,
                   o.kind AS okind, o.status, o.receipt, o.receipt_error, o.last_error
            FROM messages m LEFT JOIN LATERAL (
                SELECT kind, status, receipt, receipt_error, last_error FROM outbox
                WHERE m.role <> 'user'
                  AND idempotency_key IN (m.message_id, m.turn_id || ':handover')
                ORDER BY id LIMIT 1) o ON true
            WHERE m.conversation_id = c.id
            UNION ALL
            SELECT n.created_at, 2, n.id, 'note', n.body, n.author, NULL, NULL, NULL, NULL, NULL
            FROM notes n WHERE n.conversation_id = c.id
            UNION ALL
            SELECT e.created_at, 0, e.id, 'opened', e.reason, NULL, NULL, NULL, NULL, NULL, NULL
            FROM escalations e WHERE e.conversation_id = c.id
            UNION ALL
            SELECT e.resolved_at, 3, e.id, 'resolved', '', e.resolved_by, NULL, NULL, NULL,
                   NULL, NULL
            FROM escalations e WHERE e.conversation_id = c.id AND e.status = 'resolved'
        ) h ORDER BY at DESC, ord DESC, id DESC LIMIT %(limit)s) x)
FROM conversations c WHERE c.id = %(conv)s
"""

_OPEN = """
WITH e AS (
    SELECT id, claimed_by FROM escalations
    WHERE conversation_id = %(conv)s AND status = 'open' FOR UPDATE
)"""

# who may act: nobody has it, the agent has it, or the phone holds it (see auth.may_act)
_FREE = "(e.claimed_by IS NULL OR e.claimed_by = %(agent)s OR e.claimed_by = '" + PHONE + "')"

_CLAIM = _OPEN + """, u AS (
    UPDATE escalations x SET claimed_by = %(agent)s, claimed_at = now()
    FROM e WHERE x.id = e.id AND e.claimed_by IS DISTINCT FROM %(agent)s
      AND (""" + _FREE + """ OR %(force)s)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM e), (SELECT claimed_by FROM e), EXISTS (SELECT 1 FROM u)
"""

_REPLY = _OPEN + """, c AS (
    SELECT c.id, c.instance, c.sender,
           CASE WHEN c.instance = ANY (%(sending)s::text[]) THEN 'pending'
                ELSE 'delivered' END AS status
    FROM conversations c, e
    WHERE c.id = %(conv)s AND """ + _FREE + """
), taken AS (
    UPDATE escalations x SET claimed_by = %(agent)s, claimed_at = now()
    FROM e WHERE x.id = e.id AND EXISTS (SELECT 1 FROM c)
      AND e.claimed_by IS DISTINCT FROM %(agent)s
), said AS (
    INSERT INTO messages (conversation_id, instance, message_id, role, kind, body, author)
    SELECT c.id, c.instance, %(key)s, 'human', 'text', %(text)s, %(agent)s FROM c
    ON CONFLICT (instance, message_id) DO NOTHING
    RETURNING 1
), queued AS (
    INSERT INTO outbox (idempotency_key, kind, instance, conversation_id, target, payload,
                        status, delivered_at)
    SELECT %(key)s, 'reply', c.instance, c.id, c.sender,
           jsonb_set(%(payload)s, '{to}', to_jsonb(c.sender)), c.status,
           CASE WHEN c.status = 'delivered' THEN now() END
    FROM c WHERE EXISTS (SELECT 1 FROM said)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM e), (SELECT claimed_by FROM e), EXISTS (SELECT 1 FROM queued),
       EXISTS (SELECT 1 FROM outbox WHERE idempotency_key = %(key)s)
"""

_RESOLVE = _OPEN + """, u AS (
    UPDATE escalations x SET status = 'resolved', resolved_at = now(), resolved_by = %(agent)s
    FROM e WHERE x.id = e.id AND """ + _FREE + """
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM e), (SELECT claimed_by FROM e), EXISTS (SELECT 1 FROM u)
"""
