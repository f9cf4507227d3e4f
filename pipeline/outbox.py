"""The outbox API of the delivery task: claim the rows due, then record what became of them.

Same rules as :mod:`pipeline.store`: each method is one statement on a pooled connection,
under ``query_timeout_s``, with psycopg errors translated. Due times use the server's clock
(``now()``), so every process that delivers agrees on them.

Order per conversation is the database's job: only the *head* of a conversation's queue (its
oldest pending row) can be claimed, so a later reply can never overtake an earlier one that
is still being retried; a row that is delivered or dead lets the next one through. A claim
*leases* its rows by moving ``next_attempt_at`` past the end of the send: another process
(or this one, had it forgotten) sees the head as not due and leaves the whole conversation
alone, and a crash mid-send only delays the row until the lease ends -- it is never lost.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any, Literal

import attrs

from pipeline.store import Statements

OutboxKind = Literal["reply", "handover", "webhook"]


@attrs.frozen
class OutboxRow:
    """One claimed outbox row: what to send, to whom, and how many sends it has had."""

    id: int
    idempotency_key: str
    kind: OutboxKind
    instance: str
    conversation_id: int | None
    target: str
    payload: dict[str, Any]
    attempts: int
    #: a send of this row whose outcome is unknown started this many seconds ago (its
    #: process died, or its answer was lost); None: no send in doubt
    in_doubt_s: float | None = None
    #: what the channel said of it meanwhile: its id for the message, its latest status
    provider_id: str | None = None
    receipt: str | None = None
    #: seconds since the user's last message (the 24-hour window); None: not known
    inbound_age_s: float | None = None

    @property
    def to_user(self) -> bool:
        """A message to the user (reply, hand-over) rather than a customer webhook event:
        the channel has no idempotency key, so a send in doubt is reconciled first."""
        return self.kind != "webhook"

    @property
    def lane(self) -> int:
        """The key of its ordered queue: per conversation, one queue for what goes to the
        user (replies, hand-overs) and one for the customer's webhook events, so a slow
        customer endpoint never delays a reply; a row without a conversation is its own
        queue. The same expression as the claim statement and the ``outbox_pending_lane``
        index (migration 0003)."""
        if self.conversation_id is None:
            return -self.id
        return self.conversation_id * 2 + (1 if self.kind == "webhook" else 0)


class OutboxStore(Statements):
    """The statements of the delivery task over a :class:`Pool`; see the module docstring."""

    async def claim(self, limit: int, *, busy: Collection[int] = (), lease_s: float,
                    now: dt.datetime | None = None) -> list[OutboxRow]:
        """Lease up to ``limit`` due rows, each the oldest pending row of its conversation.

        ``busy`` are the lanes (:attr:`OutboxRow.lane`) this process is sending already; they
        are skipped. A claimed row is not due again for ``lease_s`` seconds. ``now`` replaces
        the server's clock for the due check (tests make future rows due with it).
        """
        if limit < 1:
            return []
        rows = await self._all(_CLAIM, {"limit": limit, "busy": list(busy),
                                        "lease": dt.timedelta(seconds=lease_s), "now": now})
        return sorted((OutboxRow(*row) for row in rows), key=lambda r: r.id)

    async def mark_delivered(self, row_id: int, provider_id: str | None = None, *,
                             sent: bool = True) -> bool:
        """Record a successful send (``sent`` False: a send in doubt that the channel's echo
        showed landed, not sent again); ``False`` if the row was no longer pending."""
        rows = await self._all(
            "UPDATE outbox SET status = 'delivered', delivered_at = now(),"
            " attempts = attempts + %s, last_error = NULL, sending_since = NULL,"
            " provider_id = coalesce(provider_id, %s)"
            " WHERE id = %s AND status = 'pending' RETURNING id",
            (1 if sent else 0, provider_id, row_id))
        return bool(rows)

    async def reschedule(self, row_id: int, delay_s: float, error: str, *,
                         in_doubt: bool = False) -> bool:
        """Count a failed send and make the row due again ``delay_s`` seconds from now.
        ``in_doubt``: the request may have landed (a timeout, a lost answer): the next claim
        reconciles it with the channel first."""
        rows = await self._all(
            "UPDATE outbox SET attempts = attempts + 1, last_error = %s,"
            " next_attempt_at = now() + %s,"
            " sending_since = CASE WHEN %s THEN sending_since END"
            " WHERE id = %s AND status = 'pending' RETURNING id",
            (error, dt.timedelta(seconds=delay_s), in_doubt, row_id))
        return bool(rows)

    async def await_echo(self, row_id: int, delay_s: float) -> bool:
        """A send in doubt the channel has not echoed yet: look again in ``delay_s``,
        attempts unchanged, still in doubt."""
        rows = await self._all(
            "UPDATE outbox SET next_attempt_at = now() + %s"
            " WHERE id = %s AND status = 'pending' RETURNING id",
            (dt.timedelta(seconds=delay_s), row_id))
        return bool(rows)

    async def resend(self, row_id: int) -> bool:
        """No echo came within the bound: the send in doubt is taken as lost and the row is
        sent again now (its doubt starts over with this send)."""
        rows = await self._all(
            "UPDATE outbox SET sending_since = now()"
            " WHERE id = %s AND status = 'pending' RETURNING id", (row_id,))
        return bool(rows)

    async def release(self, row_id: int) -> bool:
        """End the lease of a row whose send was abandoned unsent-or-unknown (cancelled): it
        is due at once, attempts unchanged. A webhook event's idempotency key makes its
        resend safe; a message to the user stays in doubt, reconciled before a resend."""
        rows = await self._all(
            "UPDATE outbox SET next_attempt_at = now()"
            " WHERE id = %s AND status = 'pending' RETURNING id", (row_id,))
        return bool(rows)

    async def mark_dead(self, row_id: int, reason: str) -> bool:
        """Give up on a row: status ``dead`` and a dead letter with the reason and the payload,
        in one statement (both or neither)."""
        rows = await self._all(_MARK_DEAD, {"id": row_id, "reason": reason})
        return bool(rows)

    async def counts(self) -> dict[str, int]:
        """Rows per status (for summaries and tests)."""
        rows = await self._all("SELECT status, count(*) FROM outbox GROUP BY status")
        return {str(status): int(n) for status, n in rows}


#: the queue a row is in, of the row aliased ``t`` (see OutboxRow.lane; the index of
#: migration 0003 is on this expression)
_LANE = ("CASE WHEN {t}.conversation_id IS NULL THEN -{t}.id"
         " ELSE {t}.conversation_id * 2 + ({t}.kind = 'webhook')::int END")

# Walks the due pending rows in due order (outbox_due) and keeps those with no older pending
# row in their lane (a probe of outbox_pending_lane): the heads, without sorting every
# pending row or joining the whole table -- only pending rows are read, however much
# delivered history the table holds.
_CLAIM = """
WITH due AS (
    SELECT o.id, o.sending_since AS doubt FROM outbox o
    WHERE o.status = 'pending' AND o.next_attempt_at <= coalesce(%(now)s::timestamptz, now())
      AND NOT ({lane_o} = ANY(%(busy)s::bigint[]))
      AND NOT EXISTS (SELECT 1 FROM outbox p
                      WHERE p.status = 'pending' AND {lane_p} = {lane_o} AND p.id < o.id)
    ORDER BY o.next_attempt_at, o.id
    LIMIT %(limit)s
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE outbox SET next_attempt_at = coalesce(%(now)s::timestamptz, now()) + %(lease)s,
    sending_since = CASE WHEN outbox.kind <> 'webhook' THEN coalesce(due.doubt, now()) END
FROM due
WHERE outbox.id = due.id AND outbox.status = 'pending'
  AND outbox.next_attempt_at <= coalesce(%(now)s::timestamptz, now())
RETURNING outbox.id, outbox.idempotency_key, outbox.kind, outbox.instance,
          outbox.conversation_id, outbox.target, outbox.payload, outbox.attempts,
          extract(epoch FROM now() - due.doubt)::float8, outbox.provider_id, outbox.receipt,
          (SELECT extract(epoch FROM now() - c.last_message_at)::float8 FROM conversations c
            WHERE c.id = outbox.conversation_id)
""".replace("{lane_o}", _LANE.format(t="o")).replace("{lane_p}", _LANE.format(t="p"))

_MARK_DEAD = """
WITH dead AS (
    UPDATE outbox SET status = 'dead', attempts = attempts + 1, last_error = %(reason)s
    WHERE id = %(id)s AND status = 'pending'
    RETURNING instance, idempotency_key, payload
)
INSERT INTO dead_letters (stage, reason, origin, instance, message_id, payload)
SELECT 'dispatch', %(reason)s, 'outbox', instance, idempotency_key, payload FROM dead
RETURNING id
"""
