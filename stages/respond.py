"""Responders: who answers a Turn that the escalation stage left to the AI.

Two kinds, both behind the :class:`Responder` protocol:

- :class:`RulesResponder` -- deterministic (the embedded default): the first configured rule
  whose ``match`` occurs as a word or phrase (same folding as escalation keywords, see
  :mod:`stages.textmatch`) answers; otherwise the fallback.
- :class:`OpenAIResponder` -- an OpenAI-compatible ``/v1/chat/completions`` endpoint over a
  shared ``httpx.AsyncClient``. A failing endpoint never fails the turn: after the retries the
  user gets the fallback answer (``fallback=True``), which also counts towards the "N fallback
  answers in a row" escalation -- so a dead model hands conversations to humans instead of
  leaving users unanswered.

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
import httpx
import trio
from loguru import logger

from pipeline.concurrency import Backoff, retry
from pipeline.config import ResponderConfig
from stages.escalation import EscalationRules, after_answer
from stages.records import Reply, Turn
from stages.textmatch import Matcher, words

__all__ = ["OPENAI_RETRY", "AnswerError", "OpenAIResponder", "Respond", "Responder", "Rule",
           "RulesResponder", "build_responder", "chat_messages", "confidence_of",
           "history_messages", "parse_completion"]


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


class _Retryable(AnswerError):
    """An answer worth another attempt: 429 or 5xx."""


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


#: 3 attempts, pauses of up to 0.2 then 0.4 s: a blip is bridged, a dead endpoint costs the
#: turn at most 3 x timeout_s + 0.6 s before the fallback.
OPENAI_RETRY = Backoff(attempts=3, initial_s=0.2, max_s=1.0)
_RETRY_ON = (_Retryable, httpx.TransportError, trio.TooSlowError)


def _where(url: str) -> str:
    """The URL without credentials or query, for log lines."""
    try:
        return str(httpx.URL(url).copy_with(userinfo=b"", query=None, fragment=None))
    except httpx.InvalidURL:
        return "(an invalid url)"


def _describe(exc: Exception, timeout_s: float) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {timeout_s} s"
    if isinstance(exc, AnswerError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@attrs.frozen
class OpenAIResponder:
    """An OpenAI-compatible chat endpoint; on failure, the fallback (module docstring)."""

    name: str
    url: str
    model: str
    client: httpx.AsyncClient = attrs.field(eq=False, repr=False)
    fallback: str
    api_key: str = attrs.field(default="", repr=False)
    timeout_s: float = 10.0
    system_prompt: str = "You are a helpful assistant."
    policy: Backoff = OPENAI_RETRY

    def request_body(self, turn: Turn, history: str) -> dict[str, Any]:
        return {"model": self.model,
                "messages": chat_messages(self.system_prompt, history, turn.text),
                "temperature": 0}

    async def answer(self, turn: Turn, history: str) -> Reply:
        body = self.request_body(turn, history)
        attempts = 0

        async def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return await self._post(body)

        try:
            data = await retry(attempt, retry_on=_RETRY_ON, policy=self.policy,
                               on_retry=self._log_retry)
            text, finish = parse_completion(data)
        except (AnswerError, httpx.HTTPError, httpx.InvalidURL, trio.TooSlowError) as exc:
            logger.bind(stage="respond", responder=self.name).warning(
                "responder {!r}: POST {} failed after {} attempt(s): {}; answering with the "
                "fallback", self.name, _where(self.url), attempts,
                _describe(exc, self.timeout_s))
            return Reply(self.fallback, 0.0, fallback=True, responder=self.name)
        return Reply(text, confidence_of(finish), fallback=False, responder=self.name)

    async def _post(self, body: dict[str, Any]) -> Any:
        """One attempt within ``timeout_s`` (trio's deadline is the only timeout: httpx's
        own are off so that the two cannot disagree)."""
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with trio.fail_after(self.timeout_s):
            response = await self.client.post(self.url, json=body, headers=headers,
                                              timeout=None)
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retryable(f"http {response.status_code}")
        if not response.is_success:
            raise AnswerError(f"http {response.status_code}: {response.text[:200]!r}")
        try:
            return response.json()
        except ValueError as exc:
            raise AnswerError(f"answer is not json: {response.text[:80]!r}") from exc

    def _log_retry(self, attempt: int, exc: Exception, pause: float) -> None:
        logger.bind(stage="respond", responder=self.name).debug(
            "responder {!r}: attempt {} failed ({}); retrying in {:.2f} s", self.name, attempt,
            _describe(exc, self.timeout_s), pause)


def build_responder(name: str, cfg: ResponderConfig,
                    client: httpx.AsyncClient | None) -> Responder:
    """The responder ``[responders.<name>]`` describes; ``openai`` needs the shared client."""
    if cfg.kind == "rules":
        return RulesResponder(name, tuple(Rule(r.match, r.reply, r.confidence)
                                          for r in cfg.rules), cfg.fallback)
    if client is None:
        raise ValueError(f"responder {name!r} of kind 'openai' needs an http client")
    return OpenAIResponder(name, cfg.url, cfg.model, client, cfg.fallback, api_key=cfg.api_key,
                           timeout_s=cfg.timeout_s, system_prompt=cfg.system_prompt)


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
