"""Escalations as operators see them: the open ones, and resolving one."""

from __future__ import annotations

import datetime as dt

import attrs

from pipeline.store.edge import Statements


@attrs.frozen
class EscalationRow:
    id: int
    instance: str
    sender: str
    reason: str
    created_at: dt.datetime


class EscalationStatements(Statements):
    """The operators' statements over open escalations."""

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
