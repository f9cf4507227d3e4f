"""HTTP inside an event-time replay runs on the real clock with its configured timeouts, as
live: an ``openai`` responder answering in 0.2 s gives its answers, one that never answers
gives the fallback after its ``timeout_s``; ``--compare`` shows only what the configs
change. Fake servers on 127.0.0.1 (hypercorn's Trio worker)."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
from asgi import read_request
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from test_replay import config_on

from pipeline.cli import sample_log
from pipeline.compare import compare_outcomes
from pipeline.config import Config, load_config
from pipeline.pgcluster import Cluster
from pipeline.replay import replay


@attrs.define
class CountingServer:
    """Answers every POST with 200 and a JSON id; keeps the paths posted to, and each
    request's path, headers and body."""

    posts: list[str] = attrs.field(factory=list)
    requests: list[tuple[str, dict[str, str], Any]] = attrs.field(factory=list)
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_request(scope, receive, send)
        if raw is None:
            return
        self.posts.append(scope["path"])
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["path"], headers, json.loads(raw or b"null")))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body",
                    "body": b'{"key": {"id": "sent"}, "messages": [{"id": "wamid.sent"}]}'})


@attrs.define
class FakeChat:
    """An OpenAI-compatible endpoint: answers ``re: <the turn's text>`` after ``delay_s``,
    or never (``delay_s`` None). ``calls`` counts the requests."""

    delay_s: float | None = 0.2
    calls: int = 0
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw = await read_request(scope, receive, send)
        if raw is None:
            return
        self.calls += 1
        if self.delay_s is None:
            await trio.sleep_forever()
        await trio.sleep(self.delay_s)
        text = json.loads(raw)["messages"][-1]["content"]
        body = {"id": "c", "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": f"re: {text}"},
            "finish_reason": "stop"}]}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


App = TypeVar("App", CountingServer, FakeChat)


@asynccontextmanager
async def serving(app: App) -> AsyncIterator[App]:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn_serve, app, config))  # type: ignore[arg-type]
        app.url = binds[0]
        yield app
        nursery.cancel_scope.cancel()


def assistant_config(cluster: Cluster, tmp_path: Path, url: str, timeout_s: float = 10.0,
                     *, keyword: str | None = None, name: str = "c") -> Config:
    """The default config with both instances on the ``openai`` responder at ``url``."""
    config_on(cluster, tmp_path)
    text = (tmp_path / "c.toml").read_text()
    text = re.sub(r'^url = .*$', f'url = "{url}/v1/chat/completions"', text, flags=re.M)
    text = re.sub(r'^(timeout_s = )10\.0(\s+# time one completion)', rf"\g<1>{timeout_s}\2",
                  text, flags=re.M)
    text = text.replace('responder = "rules"', 'responder = "assistant"')
    if keyword:
        text = re.sub(r'^escalation_keywords = \[\]', f'escalation_keywords = ["{keyword}"]',
                      text, count=1, flags=re.M)
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.responders["assistant"].timeout_s == timeout_s
    return cfg


def replies(text: str) -> list[str]:
    return [r["reply"] for r in map(json.loads, text.splitlines())
            if r["action"] == "replied"]


async def test_a_responder_answering_in_200_ms_gives_its_answers(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    async with serving(FakeChat(0.2)) as chat:
        cfg = assistant_config(cluster, tmp_path, chat.url)
        out = io.StringIO()
        result = await replay(cfg, [sample_log()], out=out)
    answers = replies(out.getvalue())
    assert len(answers) == 62  # every turn of the sample that is not handed over
    assert all(a.startswith("re: ") for a in answers)
    assert chat.calls == len(answers)
    assert not [r for r in result.sink.escalations if "failed answers" in r]


async def test_a_responder_that_never_answers_gives_the_fallback_after_its_timeout(
        cluster: Cluster, tmp_path: Path) -> None:
    log = tmp_path / "three.jsonl"
    lines = [t for t in sample_log().read_text("utf-8").splitlines() if '"text"' in t][:3]
    log.write_text("\n".join(lines) + "\n")
    async with serving(FakeChat(None)) as chat:
        cfg = assistant_config(cluster, tmp_path, chat.url, timeout_s=0.3)
        out = io.StringIO()
        start = time.perf_counter()
        await replay(cfg, [log], out=out)
        took = time.perf_counter() - start
    fallback = cfg.responders["assistant"].fallback
    answers = replies(out.getvalue())
    assert len(answers) == 2  # the first two lines are one sender's burst: one turn
    assert set(answers) == {fallback}
    assert chat.calls == 3 * len(answers)  # three attempts each, as live
    assert took >= 3 * 0.3  # each attempt waited its whole timeout


async def test_compare_with_an_http_responder_shows_only_the_configs_differences(
        cluster: Cluster, tmp_path: Path) -> None:
    async with serving(FakeChat(0.05)) as chat:
        a = assistant_config(cluster, tmp_path, chat.url, name="a")
        b = assistant_config(cluster, tmp_path, chat.url, keyword="price", name="b")
        texts = {}
        for name, cfg in (("a", a), ("a again", a), ("b", b)):
            out = io.StringIO()
            await replay(cfg, [sample_log()], out=out)
            texts[name] = out.getvalue()
    assert compare_outcomes(texts["a"], texts["a again"]).differences == ()
    diffs = compare_outcomes(texts["a"], texts["b"]).differences
    assert len(diffs) == 3
    for d in diffs:  # the keyword escalates demo's turns that name it; later ones are held
        assert d.instance == "demo", d
        assert d.after["action"] in ("escalated", "held"), d
    assert any("price" in (d.after["reason"] or "") for d in diffs)
