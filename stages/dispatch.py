"""Dispatch: commit the turn's effects with its outbox rows, then report the outcomes.

The AI interaction, the reply or hand-over message, the escalation, the outbox rows (each with
an idempotency key derived from the turn) and the closing of the inbox rows are one
statement: a crash or a cancellation leaves all of them or none, and redoing a turn after a
restart writes nothing twice. With the ``dry`` transport the outbox rows are recorded as
delivered; otherwise :mod:`pipeline.delivery` sends them (``on_commit`` wakes it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from pipeline.concurrency import Backoff, with_retry
from pipeline.gate import ConversationGate
from pipeline.records import Action, Outcome, Turn
from pipeline.store import Store, TurnEffects

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


def outcomes(turn: Turn, fx: TurnEffects) -> list[Outcome]:
    """One line per message: the last carries the turn's action, the others are merged."""
    assert turn.context is not None
    lines = []
    for i, msg in enumerate(turn.messages):
        last = i == len(turn.messages) - 1
        lines.append(Outcome(
            fx.action if last else "merged", msg.message_id, msg.instance, msg.sender,
            conversation_id=turn.context.conversation_id, turn_id=turn.turn_id,
            reason=fx.reason if last else None, reply=fx.reply_text if last else None,
            origin=msg.origin, timings_ms=turn.timings_ms,
            degraded=turn.context.degraded if last else (),
        ))
    return lines


@attrs.define
class Dispatch:
    store: Store
    gate: ConversationGate
    messages: dict[str, Messages]  # by instance
    transport: str
    on_commit: Callable[[], None] | None = None
    retry: Backoff | None = None

    async def __call__(self, turn: Turn) -> list[Outcome]:
        fx = effects(turn, self.messages[turn.instance], self.transport == "dry")
        await with_retry(lambda: self.store.commit_turn(fx), self.retry, "dispatch")
        if self.on_commit is not None and fx.outbox and not fx.delivered:
            self.on_commit()
        self.gate.leave(turn.key)
        return outcomes(turn, fx)
