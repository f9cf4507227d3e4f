"""The HTTP responder: an OpenAI-compatible ``/v1/chat/completions`` endpoint (the I/O
edge of :mod:`stages.respond`, which holds the protocol, the rules responder and the pure
parts of this one), and building each configured responder.

A failing endpoint never fails the turn: after the retries the user gets the fallback answer
(``fallback=True``), which also counts towards the "N failed answers in a row" escalation.
"""

from __future__ import annotations

from typing import Any

import attrs
import httpx
import trio
from loguru import logger

from pipeline.concurrency import Backoff, retry
from pipeline.config import ResponderConfig
from stages.records import Reply, Turn
from stages.respond import (
    AnswerError,
    Responder,
    Rule,
    RulesResponder,
    chat_messages,
    confidence_of,
    parse_completion,
)


class _Retryable(AnswerError):
    """An answer worth another attempt: 429 or 5xx."""


#: the pauses between attempts (``[responders.<name>] attempts`` sets how many; 3 by default:
#: a blip is bridged, a dead endpoint costs the turn at most 3 x timeout_s + 0.6 s before
#: the fallback)
OPENAI_RETRY = Backoff(attempts=3, initial_s=0.2, max_s=1.0)
_RETRY_ON = (_Retryable, httpx.TransportError, trio.TooSlowError)


def _where(url: str) -> str:
    """The URL without credentials or query, for log lines."""
    try:
        return str(httpx.URL(url).copy_with(userinfo=b"", query=None, fragment=None))
    except httpx.InvalidURL:
        return "(an invalid url)"


def _failure(exc: Exception, timeout_s: float) -> str:
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
                _failure(exc, self.timeout_s))
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
            _failure(exc, self.timeout_s), pause)


def build_responder(name: str, cfg: ResponderConfig,
                    client: httpx.AsyncClient | None) -> Responder:
    """The responder ``[responders.<name>]`` describes; ``openai`` needs the shared client."""
    if cfg.kind == "rules":
        return RulesResponder(name, tuple(Rule(r.match, r.reply, r.confidence)
                                          for r in cfg.rules), cfg.fallback)
    if client is None:
        raise ValueError(f"responder {name!r} of kind 'openai' needs an http client")
    return OpenAIResponder(name, cfg.url, cfg.model, client, cfg.fallback, api_key=cfg.api_key,
                           timeout_s=cfg.timeout_s, system_prompt=cfg.system_prompt,
                           policy=attrs.evolve(OPENAI_RETRY, attempts=cfg.attempts))
