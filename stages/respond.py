"""Responders: who answers a Turn. ``rules`` is deterministic (the embedded default)."""

from __future__ import annotations

import attrs

from pipeline.records import Reply, Turn
from stages.dedupe import normalise


@attrs.frozen
class Rule:
    match: str
    reply: str
    confidence: float = 0.9


@attrs.frozen
class RulesResponder:
    """First rule whose ``match`` occurs in the turn's text answers; else the fallback."""

    name: str
    rules: tuple[Rule, ...]
    fallback: str

    def answer(self, turn: Turn) -> Reply:
        text = normalise(turn.text)
        for rule in self.rules:
            if normalise(rule.match) in text:
                return Reply(rule.reply, rule.confidence, fallback=False, responder=self.name)
        return Reply(self.fallback, 0.0, fallback=True, responder=self.name)


@attrs.define
class Respond:
    """The stage: the instance's responder answers the turns that get a reply."""

    responders: dict[str, RulesResponder]  # by instance

    async def __call__(self, turn: Turn) -> list[Turn]:
        if turn.decision is None or turn.decision.verdict != "reply":
            return [turn]
        return [attrs.evolve(turn, reply=self.responders[turn.instance].answer(turn))]
