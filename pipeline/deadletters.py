"""Dead letters an operator can act on: list, show, send again, put aside.

A dead letter of the delivery (stage ``dispatch``) names its outbox row by idempotency key:
*retry* puts that row back in the outbox -- pending, due now, its attempts counted afresh,
the same key -- so the delivery task sends it as if it were new (a customer webhook still
sees the same ``Idempotency-Key``). A dead letter of intake (an event that could not be
understood) cannot be sent again: the sender must fix it; *discard* puts it aside. Either
way the dead letter stays, marked with who did what and when.

Used by ``pipeline deadletters`` and the ``/deadletters`` endpoints (pipeline/webhook.py);
each action is one statement.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import attrs

from pipeline.store import Statements


@attrs.frozen
class DeadLetter:
    id: int
    stage: str
    reason: str
    origin: str | None
    instance: str | None
    key: str | None  # the outbox row's idempotency key (dispatch), or the message id
    created_at: dt.datetime
    status: str
    payload: Any = None
    raw: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "stage": self.stage, "status": self.status,
                "instance": self.instance, "key": self.key, "reason": self.reason,
                "origin": self.origin, "created_at": self.created_at.isoformat()}

    def whole(self) -> dict[str, Any]:
        return {**self.summary(), "payload": self.payload, "raw": self.raw}


Verdict = Literal["retried", "discarded", "missing", "not open", "not retryable", "row gone"]

#: what each verdict means, for people
MEANING: dict[Verdict, str] = {
    "retried": "back in the outbox with its idempotency key: sent at the next poll",
    "discarded": "put aside",
    "missing": "no such dead letter",
    "not open": "already retried or discarded",
    "not retryable": "an event that could not be understood cannot be sent again (its "
                     "sender must fix it): discard it instead",
    "row gone": "its outbox row was deleted by retention: nothing to send again",
}


class DeadLetters(Statements):
    """The statements (one per call, see :class:`pipeline.store.Statements`)."""

    async def list(self, *, every: bool = False, limit: int = 100) -> list[DeadLetter]:
        """The open dead letters, oldest first (``every``: retried and discarded too)."""
        rows = await self._all(_LIST, {"every": every, "limit": limit})
        return [DeadLetter(*row) for row in rows]

    async def show(self, letter_id: int) -> DeadLetter | None:
        rows = await self._all(_SHOW, {"id": letter_id})
        return DeadLetter(*rows[0]) if rows else None

    async def retry(self, letter_id: int, by: str) -> Verdict:
        (verdict,), = await self._all(_RETRY, {"id": letter_id, "by": by})
        return verdict  # type: ignore[no-any-return]

    async def discard(self, letter_id: int, by: str) -> Verdict:
        (verdict,), = await self._all(_DISCARD, {"id": letter_id, "by": by})
        return verdict  # type: ignore[no-any-return]


_LIST = """
SELECT id, stage, reason, origin, instance, message_id, created_at, status FROM dead_letters
WHERE %(every)s OR status = 'open' ORDER BY created_at, id LIMIT %(limit)s
"""
_SHOW = """
SELECT id, stage, reason, origin, instance, message_id, created_at, status, payload, raw
FROM dead_letters WHERE id = %(id)s
"""
_RETRY = """
WITH letter AS (
    SELECT id, stage, message_id, status FROM dead_letters WHERE id = %(id)s FOR UPDATE
), row AS (
    UPDATE outbox o SET status = 'pending', attempts = 0, next_attempt_at = now(),
                        last_error = NULL, sending_since = NULL
    FROM letter l
    WHERE l.status = 'open' AND l.stage = 'dispatch' AND o.idempotency_key = l.message_id
      AND o.status = 'dead'
    RETURNING o.id
), marked AS (
    UPDATE dead_letters d SET status = 'retried', handled_at = now(), handled_by = %(by)s
    WHERE d.id = %(id)s AND EXISTS (SELECT 1 FROM row)
)
SELECT CASE
    WHEN NOT EXISTS (SELECT 1 FROM letter) THEN 'missing'
    WHEN (SELECT status FROM letter) <> 'open' THEN 'not open'
    WHEN (SELECT stage FROM letter) <> 'dispatch' THEN 'not retryable'
    WHEN NOT EXISTS (SELECT 1 FROM row) THEN 'row gone'
    ELSE 'retried' END
"""
_DISCARD = """
WITH letter AS (
    SELECT id, status FROM dead_letters WHERE id = %(id)s FOR UPDATE
), marked AS (
    UPDATE dead_letters d SET status = 'discarded', handled_at = now(), handled_by = %(by)s
    FROM letter l WHERE d.id = l.id AND l.status = 'open'
    RETURNING d.id
)
SELECT CASE
    WHEN NOT EXISTS (SELECT 1 FROM letter) THEN 'missing'
    WHEN NOT EXISTS (SELECT 1 FROM marked) THEN 'not open'
    ELSE 'discarded' END
"""
