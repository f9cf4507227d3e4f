"""Dispatch: commit the turn's effects with its outbox rows, then report the outcomes.

The AI interaction, the reply or hand-over message, the escalation, the outbox rows (each with
an idempotency key derived from the turn), the closing of the inbox rows and the end of the
conversation's lease are one statement, fenced by the claim's token: a crash or a
cancellation leaves all of them or none, a process whose lease was taken over writes
nothing, and redoing a turn writes nothing twice. With the ``dry`` transport the outbox rows
are recorded as delivered; otherwise :mod:`pipeline.delivery` sends them (``on_commit``
wakes it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from stages.records import Action, Claim, ClaimCommit, Committed, Outcome, Turn, TurnEffects

_ACTIONS: dict[str, Action] = {"reply": "replied", "escalate": "escalated", "hold": "held"}


@attrs.frozen
class Messages:
    """What the user is told when a turn is handed over, in and out of business hours."""

    handover: str
    out_of_hours: str


def effects(turn: Turn, messages: Messages, delivered: bool) -> TurnEffects:
    """What a decided turn writes (pure): the reply or hand-over message, and the customer
    webhook events -- ``turn`` for every turn, ``escalation.opened`` when it hands over."""
    assert turn.decision is not None and turn.context is not None
    decision = turn.decision
    text: str | None = None
    outbox: list[tuple[str, str, str, dict[str, Any]]] = []
    if decision.verdict == "reply" and turn.reply is not None:
        text = turn.reply.text
        outbox.append((f"{turn.turn_id}:reply", "reply", turn.sender,
                       {"to": turn.sender, "text": text}))
    elif decision.verdict == "escalate":
        text = messages.out_of_hours if decision.out_of_hours else messages.handover
        outbox.append((f"{turn.turn_id}:handover", "handover", turn.sender,
                       {"to": turn.sender, "text": text}))
    if turn.context.webhook_url:
        event = {"instance": turn.instance, "sender": turn.sender, "turn_id": turn.turn_id,
                 "action": _ACTIONS[decision.verdict], "reason": decision.reason,
                 "reply": text, "messages": [m.message_id for m in turn.messages],
                 "conversation_id": turn.context.conversation_id}
        outbox.append((f"{turn.turn_id}:webhook", "webhook", turn.context.webhook_url,
                       {"event": "turn", **event}))
        if decision.verdict == "escalate":
            outbox.append((f"{turn.turn_id}:escalation", "webhook", turn.context.webhook_url,
                           {"event": "escalation.opened", "out_of_hours": decision.out_of_hours,
                            **event}))
    return TurnEffects(turn, _ACTIONS[decision.verdict], decision.reason, text, tuple(outbox),
                       delivered)


def turn_commit(turn: Turn, fx: TurnEffects, next_due: dt.timedelta,
                now: dt.datetime | None) -> ClaimCommit:
    """The rows a turn's commit closes (pure): the last message carries the turn's action,
    the others are merged; the rows its claim closed without it keep theirs."""
    claim = turn.claim
    assert claim is not None, "a turn reaches dispatch with its claim"
    n = len(claim.row_ids)
    rows = [(row_id, fx.action if i == n - 1 else "merged", fx.reason if i == n - 1 else None,
             turn.turn_id) for i, row_id in enumerate(claim.row_ids)]
    rows += [(c.row_id, c.action, c.reason, turn.turn_id) for c in claim.closed]
    return ClaimCommit(claim, turn.instance, tuple(rows), fx, next_due, now)


def outcomes(turn: Turn, fx: TurnEffects) -> list[Outcome]:
    """One line per message: the last carries the turn's action, the others are merged;
    then the rows the claim closed without the turn (repeated texts, reactions)."""
    assert turn.context is not None
    lines = []
    for i, msg in enumerate(turn.messages):
        last = i == len(turn.messages) - 1
        lines.append(Outcome(
            fx.action if last else "merged", msg.message_id, msg.instance, msg.sender,
            conversation_id=turn.context.conversation_id, turn_id=turn.turn_id,
            reason=fx.reason if last else None, reply=fx.reply_text if last else None,
            origin=msg.origin, timings_ms=turn.timings_ms,
            degraded=turn.context.degraded if last else (), at=msg.received_at,
        ))
    for closed in turn.claim.closed if turn.claim else ():
        msg = closed.message
        lines.append(Outcome(closed.action, msg.message_id, msg.instance, msg.sender,
                             reason=closed.reason, origin=msg.origin, at=msg.received_at))
    return lines


class Commits(Protocol):
    """Where a turn's commit goes: one statement, fenced by the claim's token (the pipeline
    gives the store, retried while the database is unavailable)."""

    async def commit_claim(self, commit: ClaimCommit) -> Committed: ...


@attrs.define
class Dispatch:
    store: Commits
    messages: dict[str, Messages]  # by instance
    dry: Mapping[str, bool]  # by instance: its channel records rather than sends
    finished: Callable[[Claim, dt.datetime | None], None]
    now: Callable[[], dt.datetime | None]  # None: the database's clock
    next_due: dt.timedelta
    on_commit: Callable[[], None] | None = None

    async def __call__(self, turn: Turn) -> list[Outcome]:
        fx = effects(turn, self.messages[turn.instance], self.dry.get(turn.instance, True))
        commit = turn_commit(turn, fx, self.next_due, self.now())
        done = await self.store.commit_claim(commit)
        assert turn.claim is not None
        self.finished(turn.claim, done.next_due)
        if self.on_commit is not None and fx.outbox and not fx.delivered:
            self.on_commit()
        return outcomes(turn, fx)
