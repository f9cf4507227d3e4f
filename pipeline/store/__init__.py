"""The store API: every SQL statement the stages need, each one round trip.

Stages call these methods and never see a connection. Each method borrows a pooled
connection for exactly one statement (no Turn ever holds a connection while it waits for
another), runs under ``query_timeout_s`` and translates psycopg errors into
:class:`pipeline.db.DatabaseError` subclasses. Writes that belong together are one statement
(data-modifying CTEs), so a cancellation can never leave half of them behind.

The statements are split by table family -- ``inbox.py``, ``receipts.py``, ``context.py``,
``claims.py``, ``leases.py``, ``escalations.py`` -- each a mixin over the one error edge of
``edge.py``; :class:`Store` is all of them. Import from here, not from the modules.
"""

from __future__ import annotations

from pipeline.store.claims import ClaimBatch, Claimed, ClaimRequest, ClaimStatements
from pipeline.store.context import ContextRequest, ContextStatements
from pipeline.store.edge import ClaimConflict, QueryTimeout, Statements
from pipeline.store.escalations import EscalationRow, EscalationStatements
from pipeline.store.inbox import InboxStatements, InstanceRow, message_from_json, message_json
from pipeline.store.leases import LeaseStatements
from pipeline.store.receipts import PhoneRule, ReceiptStatements

__all__ = [
    "ClaimBatch",
    "ClaimConflict",
    "ClaimRequest",
    "Claimed",
    "ContextRequest",
    "EscalationRow",
    "InstanceRow",
    "PhoneRule",
    "QueryTimeout",
    "Statements",
    "Store",
    "message_from_json",
    "message_json",
]


class Store(InboxStatements, ReceiptStatements, ContextStatements, ClaimStatements,
            LeaseStatements, EscalationStatements):
    """Small async API over a :class:`Pool`; see the module docstring."""

    async def ping(self) -> None:
        await self._all("SELECT 1")
