"""Claims: the database owns the work. One statement finds the conversations whose head turn
is closed and leases them to this process (:mod:`pipeline.claims` runs it); what a lease
then allows is :mod:`pipeline.store.leases`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs

from pipeline.store.context import (
    ESCALATED_OF,
    FALLBACKS_OF,
    HISTORY_OF,
    ContextRequest,
    turn_context,
)
from pipeline.store.edge import Statements
from pipeline.store.inbox import message_from_json
from stages.records import InboundMessage, TurnContext
from stages.turns import BurstRules


@attrs.frozen
class ClaimRequest:
    """What :meth:`Store.claim` takes: up to ``limit`` conversations due at ``now`` (None:
    the database's clock, which live intake stamps ``received_at`` with)."""

    owner: str
    now: dt.datetime | None
    limit: int
    lease_s: float
    rules: BurstRules
    rows_per_claim: int = 64
    held: tuple[int, ...] = ()  # conversations this process works on already
    #: load each claimed conversation's context with the claim ([context] mode "claimed")
    context: ContextRequest | None = None


@attrs.frozen
class Claimed:
    """One claimed conversation: its pending rows (oldest first, with their inbox ids) and
    the texts it answered recently (the repeated-text window)."""

    conversation_id: int
    token: int
    attempts: int
    rows: tuple[tuple[int, InboundMessage], ...]
    recent: tuple[tuple[dt.datetime, str], ...]
    context: TurnContext | None = None  # when the claim loaded it
    #: taken over from a lease that had expired (its process died or stalled)
    expired: bool = False


@attrs.frozen
class ClaimBatch:
    claims: tuple[Claimed, ...]
    next_due: dt.datetime | None  # the earliest due work not claimed now
    candidates: int  # conversations that were due (claimed, deferred or found idle)
    now: dt.datetime  # the time the claim decided on (the database's clock if asked)


class ClaimStatements(Statements):
    """Taking work: the database decides which conversations are due and leases them."""

    async def claim(self, req: ClaimRequest) -> ClaimBatch:
        """Take up to ``req.limit`` conversations whose head turn is closed at ``req.now``,
        each under a lease with a new fencing token; defer those still open (their
        ``due_at`` moves to their deadline). One statement; many processes may run it at
        once (``FOR UPDATE SKIP LOCKED``: each conversation goes to one of them)."""
        rules = req.rules
        rows = await self._all(_CLAIM, {
            "now": req.now, "limit": req.limit, "owner": req.owner,
            "lease": dt.timedelta(seconds=req.lease_s), "rows": req.rows_per_claim,
            "window": rules.window, "max_wait": rules.wait, "max_messages": rules.limit,
            "text_window": rules.text_window, "held": list(req.held),
            "ctx": req.context is not None,
            "chars": req.context.history_chars if req.context else 0,
            "n": req.context.recent_interactions if req.context else 0,
            "min_conf": req.context.min_confidence if req.context else 0.0,
        })
        claims_json, later, next_due, candidates, now = rows[0]
        return ClaimBatch(
            claims=tuple(_claimed(c) for c in claims_json or ()),
            next_due=min((t for t in (later, next_due) if t is not None), default=None),
            candidates=int(candidates),
            now=now,
        )


def _claimed(data: dict[str, Any]) -> Claimed:
    return Claimed(
        conversation_id=int(data["conv"]), token=int(data["token"]),
        attempts=int(data["attempts"]),
        rows=tuple((int(r["id"]), message_from_json(r["message"])) for r in data["rows"] or ()),
        recent=tuple((dt.datetime.fromisoformat(r["at"]), r["text"] or "")
                     for r in data["recent"] or ()),
        context=(turn_context(int(data["conv"]), *data["ctx"]) if data.get("ctx") is not None
                 else None),
        expired=bool(data.get("expired")),
    )


# the head of each due conversation's queue, decided over the rows' recorded times: a turn is
# ready when a later row arrived after its deadline, when it is full, or when `now` is past
# its deadline. Repeated texts and reactions count here like any row, so this deadline is
# never earlier than the one the claim then computes without them (stages/turns.py): every
# row that can join the turn is in the inbox when it is claimed.
_CLAIM = """
WITH clock AS (SELECT coalesce(%(now)b::timestamptz, clock_timestamp()) AS now),
cand AS (
    SELECT id, instance, sender, lease_until IS NOT NULL AS expired FROM conversations
    WHERE due_at <= (SELECT now FROM clock) AND (lease_until IS NULL OR lease_until < now())
      AND id <> ALL (%(held)b::bigint[])
    ORDER BY due_at, id LIMIT %(limit)b
    FOR UPDATE SKIP LOCKED
), pend AS (
    SELECT c.id AS conv, i.id, i.received_at, i.message,
           row_number() OVER w AS rn, first_value(i.received_at) OVER w AS first_at,
           i.received_at - lag(i.received_at) OVER w AS gap
    FROM cand c CROSS JOIN LATERAL (
        SELECT p.id, p.received_at, p.message FROM inbox p
        WHERE p.instance = c.instance AND p.sender = c.sender AND p.status = 'pending'
        ORDER BY p.received_at, p.id LIMIT %(rows)b) i
    WINDOW w AS (PARTITION BY c.id ORDER BY i.received_at, i.id)
), chain AS (
    SELECT conv, received_at, first_at,
           bool_and(coalesce(gap <= %(window)b, true)
                    AND received_at <= first_at + %(max_wait)b AND rn <= %(max_messages)b)
               OVER (PARTITION BY conv ORDER BY received_at, id) AS in_head
    FROM pend
), heads AS (
    SELECT conv, min(first_at) AS first_at, max(received_at) FILTER (WHERE in_head) AS last_at,
           count(*) FILTER (WHERE in_head) AS n, bool_or(NOT in_head) AS followed
    FROM chain GROUP BY conv
), decided AS (
    SELECT conv, first_at, least(last_at + %(window)b, first_at + %(max_wait)b) AS deadline,
           followed OR n >= %(max_messages)b
               OR least(last_at + %(window)b, first_at + %(max_wait)b)
                  < (SELECT now FROM clock) AS ready
    FROM heads
), claimed AS (
    UPDATE conversations c SET lease_owner = %(owner)b, lease_token = nextval('lease_tokens'),
                               lease_until = now() + %(lease)b
    FROM decided d JOIN cand e ON e.id = d.conv WHERE c.id = d.conv AND d.ready
    RETURNING c.id, c.instance, c.sender, c.lease_token, c.attempts, d.first_at, e.expired
), later AS (
    UPDATE conversations c SET due_at = d.deadline + interval '1 millisecond'
    FROM decided d WHERE c.id = d.conv AND NOT d.ready
    RETURNING c.due_at
), idle AS (  -- due, but nothing pending: only when the counter agrees (it sees new rows)
    UPDATE conversations c SET due_at = NULL
    FROM cand WHERE c.id = cand.id AND c.pending <= 0
      AND NOT EXISTS (SELECT 1 FROM pend WHERE pend.conv = cand.id)
)
SELECT
    (SELECT json_agg(json_build_object(
        'conv', cl.id, 'token', cl.lease_token, 'attempts', cl.attempts,
        'expired', cl.expired,
        'ctx', CASE WHEN %(ctx)b THEN json_build_array(""" \
    + HISTORY_OF.format(conv="cl.id", turn="''") + """,
            (SELECT settings ->> 'webhook_url' FROM instances WHERE name = cl.instance),""" \
    + ESCALATED_OF.format(conv="cl.id") + "," \
    + FALLBACKS_OF.format(conv="cl.id", turn="''") + """) END,
        'rows', (SELECT json_agg(json_build_object('id', p.id, 'message', p.message)
                                 ORDER BY p.received_at, p.id)
                 FROM pend p WHERE p.conv = cl.id),
        'recent', (SELECT json_agg(json_build_object('at', r.received_at,
                                                     'text', r.message ->> 'text')
                                   ORDER BY r.received_at, r.id)
                   FROM inbox r WHERE r.instance = cl.instance AND r.sender = cl.sender
                     AND r.status = 'processed'
                     AND r.action IN ('replied', 'escalated', 'held', 'merged')
                     AND r.received_at >= cl.first_at - %(text_window)b))
        ORDER BY cl.id) FROM claimed cl),
    (SELECT min(due_at) FROM later),
    (SELECT min(due_at) FROM conversations
      WHERE due_at > (SELECT now FROM clock)
        AND (lease_until IS NULL OR lease_until < now())
        AND id <> ALL (%(held)b::bigint[])),
    (SELECT count(*) FROM cand),
    (SELECT now FROM clock)
"""
