"""Escalation: pure rules over the loaded context decide reply, escalate or hold.

Order of the rules (the common ground of Chatwoot, Rasa, Intercom and Zendesk, see
shared/research): a conversation already with a human is held (the user's messages are
stored, the AI stays silent); an explicit request or a keyword hands over; so do N fallback
answers in a row; otherwise the assistant replies.
"""

from __future__ import annotations

import attrs

from pipeline.records import Decision, Turn, TurnContext
from stages.dedupe import normalise


@attrs.frozen
class EscalationRules:
    keywords: tuple[str, ...]
    max_failed_answers: int


def decide(turn: Turn, ctx: TurnContext, rules: EscalationRules) -> Decision:
    if ctx.escalated:
        return Decision("hold", "conversation is with a human")
    text = normalise(turn.text)
    for keyword in rules.keywords:
        if keyword and normalise(keyword) in text:
            return Decision("escalate", f"keyword: {keyword}")
    streak = 0
    for fallback in ctx.recent_fallbacks:
        if not fallback:
            break
        streak += 1
    if streak >= rules.max_failed_answers:
        return Decision("escalate", f"{streak} fallback answers in a row")
    return Decision("reply")


@attrs.define
class Escalation:
    """The stage: per-instance rules, applied to the loaded context."""

    rules: dict[str, EscalationRules]

    async def __call__(self, turn: Turn) -> list[Turn]:
        assert turn.context is not None, "escalation runs after the context stage"
        return [attrs.evolve(turn, decision=decide(turn, turn.context, self.rules[turn.instance]))]
