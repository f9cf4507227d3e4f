"""Responders: who answers a Turn that the escalation stage left to the AI.

Two kinds, both behind the :class:`Responder` protocol:

- :class:`RulesResponder` -- deterministic (the embedded default): the first configured rule
  whose ``match`` occurs as a word or phrase (same folding as escalation keywords, see
  :mod:`stages.textmatch`) answers; otherwise the fallback.
- ``OpenAIResponder`` (:mod:`pipeline.responders`, the HTTP edge) -- an OpenAI-compatible
  ``/v1/chat/completions`` endpoint over a shared ``httpx.AsyncClient``; this module holds
  its pure parts (the request's messages, reading a completion, its confidence). A failing
  endpoint never fails the turn: after the retries the user gets the fallback answer
  (``fallback=True``), which also counts towards the "N fallback answers in a row"
  escalation -- so a dead model hands conversations to humans instead of leaving users
  unanswered.

Confidence of an OpenAI answer: chat endpoints report no calibrated confidence, only why
generation ended. ``finish_reason == "stop"`` (the model ended its answer itself) is recorded
as 0.8; anything else (``length``: cut off, ``content_filter``, missing) as 0.5, a complete
but doubtful answer. Both stay below the rules' hand-written 0.85-0.95 so that the two kinds
can be compared in ``ai_interactions``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from stages.escalation import EscalationRules, after_answer
from stages.records import Reply, Turn
from stages.textmatch import Matcher, words

__all__ = ["AnswerError", "Respond", "Responder", "Rule", "RulesResponder", "chat_messages",
           "confidence_of", "history_messages", "parse_completion"]


class Responder(Protocol):
    """Anything that answers a turn, given the conversation's history before it."""

    async def answer(self, turn: Turn, history: str) -> Reply:
        """The reply to ``turn``; ``history`` is ``turn.context.history``."""
        ...


# --- rules ------------------------------------------------------------------------------------

@attrs.frozen
class Rule:
    match: str
    reply: str
    confidence: float = 0.9


def _compile_rules(responder: RulesResponder) -> Matcher:
    return Matcher.of(rule.match for rule in responder.rules)


@attrs.frozen
class RulesResponder:
    """First rule whose ``match`` occurs in the turn's text answers; else the fallback.

    The matches are compiled once, here (``ValueError`` for one without letters or digits).
    """

    name: str
    rules: tuple[Rule, ...]
    fallback: str
    _matcher: Matcher = attrs.field(init=False, eq=False, repr=False,
                                    default=attrs.Factory(_compile_rules, takes_self=True))

    def reply_to(self, text: str) -> Reply:
        """The answer to ``text`` (pure; the history plays no part)."""
        found = self._matcher.first_index(words(text))
        if found is None:
            return Reply(self.fallback, 0.0, fallback=True, responder=self.name)
        rule = self.rules[found]
        return Reply(rule.reply, rule.confidence, fallback=False, responder=self.name)

    async def answer(self, turn: Turn, history: str) -> Reply:
        return self.reply_to(turn.text)


# --- OpenAI-compatible chat completions -------------------------------------------------------

_LINE = re.compile(r"(user|assistant|human): ?(.*)")
_ROLES = {"user": "user", "assistant": "assistant", "human": "assistant"}


def history_messages(history: str) -> list[dict[str, str]]:
    """The history lines (``user: ...``, ``assistant: ...``, ``human: ...``) as chat messages.

    A human agent's messages are the business speaking, so they become ``assistant``. A line
    without a role prefix continues the message before it (a body may span lines); one before
    any prefix is the tail of a message cut by the history's character limit and is dropped.
    """
    out: list[dict[str, str]] = []
    for line in history.splitlines():
        if m := _LINE.fullmatch(line):
            out.append({"role": _ROLES[m[1]], "content": m[2]})
        elif out:
            out[-1]["content"] += "\n" + line
    return out


def chat_messages(system_prompt: str, history: str, text: str) -> list[dict[str, str]]:
    """System prompt, the history in order, then the turn's text as the last user message."""
    return [{"role": "system", "content": system_prompt}, *history_messages(history),
            {"role": "user", "content": text}]


class AnswerError(Exception):
    """The endpoint answered, but not with a usable completion; the message says what was
    wrong. The responder turns it into the fallback answer, so it never leaves the stage."""


def parse_completion(data: Any) -> tuple[str, str | None]:
    """``(content stripped, finish_reason)`` of a chat completion, or ``AnswerError``."""
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise AnswerError("answer has no choices[0].message.content") from exc
    if not isinstance(content, str) or not content.strip():
        raise AnswerError(f"choices[0].message.content is empty or not text: {content!r:.40}")
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return content.strip(), finish if isinstance(finish, str) else None


def confidence_of(finish_reason: str | None) -> float:
    """0.8 for an answer the model finished itself, 0.5 otherwise (module docstring)."""
    return 0.8 if finish_reason == "stop" else 0.5


# --- the stage --------------------------------------------------------------------------------

@attrs.define
class Respond:
    """The stage: the instance's responder answers the turns whose verdict is ``reply``;
    held and escalated turns pass through unchanged."""

    responders: Mapping[str, Responder]  # by instance
    #: by instance; with them, an answer that would be the Nth failed one in a row is
    #: replaced by a hand-over (:func:`stages.escalation.after_answer`)
    rules: Mapping[str, EscalationRules] | None = None

    async def __call__(self, turn: Turn) -> list[Turn]:
        if turn.decision is None or turn.decision.verdict != "reply":
            return [turn]
        history = turn.context.history if turn.context is not None else ""
        reply = await self.responders[turn.instance].answer(turn, history)
        if self.rules is not None and turn.context is not None:
            handover = after_answer(turn, turn.context, reply, self.rules[turn.instance])
            if handover is not None:
                return [attrs.evolve(turn, decision=handover, reply=None)]
        return [attrs.evolve(turn, reply=reply)]
