"""Responders: the rules table, and the OpenAI-compatible one against a real fake endpoint on
127.0.0.1 (an ASGI app under hypercorn's Trio worker).

The OpenAI tests use small *real* timeouts, not the autojump clock: with real sockets the
autojump clock jumps while a socket waits and fires the timeouts spuriously.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
from asgi import read_request
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from loguru import logger

from pipeline.concurrency import Backoff
from pipeline.config import ResponderConfig, RuleConfig
from pipeline.responders import OpenAIResponder, build_responder
from stages.records import Decision, InboundMessage, Reply, Turn, TurnContext
from stages.respond import (
    AnswerError,
    Respond,
    Rule,
    RulesResponder,
    chat_messages,
    confidence_of,
    history_messages,
    parse_completion,
)

API_KEY = "sk-test-secret-0123456789"
FALLBACK = "Sorry, I did not understand."
FAST = Backoff(attempts=3, initial_s=0.01, max_s=0.02, jitter=False)
TIMEOUT_S = 0.2
AT = dt.datetime(2025, 9, 1, 12, tzinfo=dt.UTC)


def turn(*texts: str, history: str = "", verdict: str = "reply") -> Turn:
    msgs = tuple(InboundMessage("demo", f"m{i}", "5511", "text", t, AT, AT, "cloud-api")
                 for i, t in enumerate(texts))
    return Turn("t1", "demo", "5511", msgs, context=TurnContext(1, history=history),
                decision=Decision(verdict))  # type: ignore[arg-type]


# --- rules --------------------------------------------------------------------------------

RULES = RulesResponder("rules", (
    Rule("opening hours", "9 to 18", 0.9),
    Rule("open", "We open at 9", 0.7),
    Rule("preço", "R$ 10", 0.9),
    Rule("entreg*", "Entregamos", 0.85),
    Rule("precio", "10 euros", 0.8),
    Rule("السعر", "١٠ ريال", 0.8),
), FALLBACK)


@pytest.mark.parametrize(("text", "reply", "confidence"), [
    ("What are your OPENING HOURS?", "9 to 18", 0.9),  # the first rule in the table wins
    ("are you open today", "We open at 9", 0.7),
    ("Qual o PRECO?", "R$ 10", 0.9),
    ("vocês entregam no sábado?", "Entregamos", 0.85),
    ("¿Cuál es el precio?", "10 euros", 0.8),
    ("كم السعر؟", "١٠ ريال", 0.8),
    ("reopening soon?", FALLBACK, 0.0),  # a word containing "open" is not "open"
    ("preçofixo", FALLBACK, 0.0),
    ("", FALLBACK, 0.0),
])
async def test_rules_responder(text: str, reply: str, confidence: float) -> None:
    answer = await RULES.answer(turn(text), "user: anything\nassistant: ignored")
    assert answer == Reply(reply, confidence, fallback=reply == FALLBACK, responder="rules")


def test_rules_with_a_match_that_can_never_match_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^'\?\?' has no letters or digits to match$"):
        RulesResponder("r", (Rule("??", "x"),), FALLBACK)


# --- request shape and answer parsing (pure) ------------------------------------------------

@pytest.mark.parametrize(("history", "messages"), [
    ("", []),
    ("user: hi\nassistant: hello!\nuser: price?",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
      {"role": "user", "content": "price?"}]),
    ("ut of a cut message\nuser: line one\nline two\nhuman: agent here",
     [{"role": "user", "content": "line one\nline two"},
      {"role": "assistant", "content": "agent here"}]),
    ("assistant:", [{"role": "assistant", "content": ""}]),
])
def test_history_lines_become_chat_messages(history: str,
                                            messages: list[dict[str, str]]) -> None:
    assert history_messages(history) == messages


def test_chat_messages_are_system_history_then_the_turn() -> None:
    assert chat_messages("be brief", "user: a\nassistant: b", "c\nd") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}]


@pytest.mark.parametrize(("data", "parsed"), [
    ({"choices": [{"message": {"content": "  hi \n"}, "finish_reason": "stop"}]}, ("hi", "stop")),
    ({"choices": [{"message": {"content": "hi"}}]}, ("hi", None)),
    ({"choices": [{"message": {"content": "hi"}, "finish_reason": 3}]}, ("hi", None)),
])
def test_parse_completion(data: Any, parsed: tuple[str, str | None]) -> None:
    assert parse_completion(data) == parsed


@pytest.mark.parametrize(("data", "error"), [
    ({}, r"^answer has no choices\[0\]\.message\.content$"),
    ({"choices": []}, r"^answer has no choices"),
    ([1, 2], r"^answer has no choices"),
    ({"choices": [{"message": {"content": None}}]}, r"^choices\[0\]\.message\.content is empty"),
    ({"choices": [{"message": {"content": "  "}}]}, r"^choices\[0\]\.message\.content is empty"),
])
def test_parse_completion_refuses_malformed_answers(data: Any, error: str) -> None:
    with pytest.raises(AnswerError, match=error):
        parse_completion(data)


@pytest.mark.parametrize(("finish", "confidence"), [
    ("stop", 0.8), ("length", 0.5), ("content_filter", 0.5), (None, 0.5)])
def test_confidence_of(finish: str | None, confidence: float) -> None:
    assert confidence_of(finish) == confidence


# --- the fake endpoint ----------------------------------------------------------------------

@attrs.define
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@attrs.define
class FakeOpenAI:
    """An OpenAI-compatible chat endpoint that plays ``script``, one step per request:
    ``ok``, ``length`` (finish_reason), ``500``, ``429``, ``400``, ``stall``, ``garbage``,
    ``empty``; ``ok`` once the script is played out."""

    script: list[str] = attrs.field(factory=list)
    seen: list[Seen] = attrs.field(factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_request(scope, receive, send)
        if raw is None:
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append(Seen(scope["method"], scope["path"], headers, json.loads(raw)))
        step = self.script.pop(0) if self.script else "ok"
        await self._play(step, send)

    async def _play(self, step: str, send: Any) -> None:
        if step == "stall":
            await trio.sleep(10 * TIMEOUT_S)  # the client gives up first
        body = _BODIES.get(step, b'{"error": {"message": "nope"}}')
        status = 200 if step in _BODIES else int(step)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def _completion(content: str, finish: str) -> bytes:
    return json.dumps({"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": finish}]}).encode()


_BODIES = {
    "ok": _completion("  Our prices are online.\n", "stop"),
    "stall": _completion("too late", "stop"),
    "length": _completion("A long answer that was cut", "length"),
    "garbage": b'{"choices": [{"mess',
    "empty": b'{"choices": []}',
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    app = FakeOpenAI()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, config))  # type: ignore[arg-type]
        app.url = f"{binds[0]}/v1/chat/completions"
        yield app
        nursery.cancel_scope.cancel()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG",
                      format="{level} {message}")
    yield lines
    logger.remove(sink)


def responder(url: str, client: httpx.AsyncClient, api_key: str = API_KEY) -> OpenAIResponder:
    return OpenAIResponder("assistant", url, "llama3.2", client, FALLBACK, api_key=api_key,
                           timeout_s=TIMEOUT_S, system_prompt="You are a shop assistant.",
                           policy=FAST)


HISTORY = "user: hi\nassistant: Hello! How can I help?"


async def test_a_normal_answer_and_the_request_shape(fake: FakeOpenAI,
                                                     client: httpx.AsyncClient) -> None:
    reply = await responder(fake.url, client).answer(turn("how much", "is it?"), HISTORY)
    assert reply == Reply("Our prices are online.", 0.8, fallback=False, responder="assistant")
    [seen] = fake.seen
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert seen.headers["authorization"] == f"Bearer {API_KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.body == {"model": "llama3.2", "temperature": 0, "messages": [
        {"role": "system", "content": "You are a shop assistant."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "how much\nis it?"},
    ]}


async def test_no_api_key_sends_no_authorization(fake: FakeOpenAI,
                                                 client: httpx.AsyncClient) -> None:
    await responder(fake.url, client, api_key="").answer(turn("hi"), "")
    assert "authorization" not in fake.seen[0].headers
    assert [m["role"] for m in fake.seen[0].body["messages"]] == ["system", "user"]


async def test_a_cut_answer_gets_the_lower_confidence(fake: FakeOpenAI,
                                                      client: httpx.AsyncClient) -> None:
    fake.script = ["length"]
    reply = await responder(fake.url, client).answer(turn("hi"), "")
    assert (reply.text, reply.confidence, reply.fallback) == (
        "A long answer that was cut", 0.5, False)


@pytest.mark.parametrize("script", [["500"], ["429"], ["503", "502"], ["stall"],
                                    ["stall", "500"]])
async def test_retries_recover(fake: FakeOpenAI, client: httpx.AsyncClient, logs: list[str],
                               script: list[str]) -> None:
    fake.script = list(script)
    reply = await responder(fake.url, client).answer(turn("hi"), "")
    assert reply == Reply("Our prices are online.", 0.8, fallback=False, responder="assistant")
    assert len(fake.seen) == len(script) + 1
    assert len([line for line in logs if line.startswith("DEBUG")]) == len(script)
    assert not [line for line in logs if line.startswith("WARNING")]


@pytest.mark.parametrize(("script", "attempts", "what"), [
    (["500"] * 3, 3, "http 500"),
    (["429"] * 3, 3, "http 429"),
    (["stall"] * 3, 3, f"no answer within {TIMEOUT_S} s"),
    (["garbage"], 1, "answer is not json: "),
    (["empty"], 1, "answer has no choices[0].message.content"),
    (["400"], 1, "http 400: "),
])
async def test_failures_end_in_the_fallback(fake: FakeOpenAI, client: httpx.AsyncClient,
                                            logs: list[str], script: list[str], attempts: int,
                                            what: str) -> None:
    fake.script = list(script)
    start = trio.current_time()
    reply = await responder(fake.url, client).answer(turn("hi"), HISTORY)
    elapsed = trio.current_time() - start
    assert reply == Reply(FALLBACK, 0.0, fallback=True, responder="assistant")
    assert len(fake.seen) == attempts
    [warning] = [line for line in logs if line.startswith("WARNING")]
    assert warning.startswith(
        f"WARNING responder 'assistant': POST {fake.url} failed after {attempts} attempt(s): "
        f"{what}")
    assert warning.endswith("; answering with the fallback")
    assert all(API_KEY not in line for line in logs)
    if script[0] == "stall":
        assert 3 * TIMEOUT_S <= elapsed < 3 * TIMEOUT_S + 1.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_connection_is_retried_then_falls_back(client: httpx.AsyncClient,
                                                               logs: list[str]) -> None:
    url = f"http://user:pw@127.0.0.1:{_closed_port()}/v1/chat/completions?key=k"
    reply = await responder(url, client).answer(turn("hi"), "")
    assert reply.fallback and reply.text == FALLBACK
    [warning] = [line for line in logs if line.startswith("WARNING")]
    assert "failed after 3 attempt(s): ConnectError" in warning
    assert "pw" not in warning and "key=k" not in warning


async def test_an_invalid_url_falls_back_at_once(client: httpx.AsyncClient,
                                                 logs: list[str]) -> None:
    reply = await responder("http://[::1/v1", client).answer(turn("hi"), "")
    assert reply.fallback
    [line] = logs
    assert re.fullmatch(r"WARNING responder 'assistant': POST \(an invalid url\) failed after 1 "
                        r"attempt\(s\): InvalidURL: .+; answering with the fallback", line)


# --- build_responder and the stage ----------------------------------------------------------

async def test_build_responder(client: httpx.AsyncClient) -> None:
    rules = build_responder("faq", ResponderConfig(
        rules=(RuleConfig(match="price", reply="$1", confidence=0.7),), fallback="?"), None)
    assert rules == RulesResponder("faq", (Rule("price", "$1", 0.7),), "?")
    cfg = ResponderConfig(kind="openai", url="http://127.0.0.1:1/v1/chat/completions",
                          model="m", api_key=API_KEY, timeout_s=3.0, system_prompt="s",
                          attempts=5)
    openai = build_responder("assistant", cfg, client)
    assert isinstance(openai, OpenAIResponder)
    assert (openai.url, openai.model, openai.api_key, openai.timeout_s, openai.system_prompt,
            openai.client, openai.policy.attempts) == (cfg.url, "m", API_KEY, 3.0, "s", client,
                                                       5)
    assert API_KEY not in repr(openai)
    with pytest.raises(ValueError, match=r"^responder 'assistant' of kind 'openai' needs an "
                                         r"http client$"):
        build_responder("assistant", cfg, None)


@attrs.define
class Recording:
    calls: list[tuple[str, str]] = attrs.field(factory=list)

    async def answer(self, turn: Turn, history: str) -> Reply:
        self.calls.append((turn.text, history))
        return Reply("ok", 1.0, fallback=False, responder="rec")


@pytest.mark.parametrize("verdict", ["escalate", "hold"])
async def test_the_stage_passes_other_verdicts_through(verdict: str) -> None:
    recording = Recording()
    t = turn("agent", verdict=verdict)
    assert await Respond({"demo": recording})(t) == [t]
    assert recording.calls == []


async def test_the_stage_answers_replies_with_the_history() -> None:
    recording = Recording()
    [out] = await Respond({"demo": recording})(turn("hi", history=HISTORY))
    assert out.reply == Reply("ok", 1.0, fallback=False, responder="rec")
    assert recording.calls == [("hi", HISTORY)]
