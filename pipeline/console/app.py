"""The console's routes, served by the webhook server under ``/console``.

Plain HTML forms that work without JavaScript (each action posts, then redirects back to the
page: reloading never repeats it), enhanced by htmx from the package (``hx-boost`` swaps
pages in place, the queue and an open conversation refresh every ``refresh_s``). Every page
and action needs a session or ``Authorization: Bearer <token>``; a script that asks for
``application/json`` gets JSON instead of pages.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import attrs
import jinja2
from loguru import logger

from pipeline.asgi import Receive, Response, Scope, TooLarge, headers_of, read_body
from pipeline.config import ConsoleConfig, DispatchConfig, InstanceConfig
from pipeline.console import auth
from pipeline.console.queries import ConsoleStore, Conversation, Waiting
from pipeline.console.views import MAX_TEXT, NOTICES, Window, duration, window
from pipeline.db import DatabaseError

PREFIX = "/console"
MAX_FORM_BYTES = 64 * 1024
_NONCE = re.compile(r"[0-9a-f]{32}")
_STATIC = {"htmx.min.js": "text/javascript; charset=utf-8",
           "console.css": "text/css; charset=utf-8"}
_SECURITY = (
    ("content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("cache-control", "no-store"),
)
_ACTIONS = ("claim", "reply", "note", "resolve")


@attrs.frozen
class Request:
    method: str
    path: str  # below /console, without a trailing slash ("" for the root)
    query: Mapping[str, str]
    headers: Mapping[str, str]
    client: str | None
    form: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def wants_json(self) -> bool:
        return "application/json" in self.headers.get("accept", "")


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.console", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["ago"] = lambda at, now: duration(now - at) if at else "-"
    env.filters["clock"] = lambda at: at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") \
        if at else ""
    return env


def _html(status: int, body: str, *extra: tuple[str, str]) -> Response:
    return Response(status, body, (("content-type", "text/html; charset=utf-8"),
                                   *_SECURITY, *extra))


def _redirect(to: str, *extra: tuple[str, str]) -> Response:
    return Response(303, "", (("location", to), *_SECURITY, *extra))


@attrs.define
class Console:
    """Answers ``/console`` requests; see the module docstring."""

    cfg: ConsoleConfig
    store: ConsoleStore
    instances: Mapping[str, InstanceConfig]
    dispatch: DispatchConfig
    #: told when an agent's reply is in the outbox (wakes this process's delivery)
    queued: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.time
    _env: jinja2.Environment = attrs.field(factory=_templates, init=False)

    async def __call__(self, scope: Scope, receive: Receive) -> Response:
        path = scope["path"].removeprefix(PREFIX).rstrip("/")
        query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode(
            "latin-1")).items()}
        client = (scope.get("client") or (None, 0))[0]
        req = Request(scope["method"], path, query, headers_of(scope), client)
        if not self.cfg.token:
            return Response(404, {"error": "the console is off: set [console] token (or "
                                  "PIPELINE_CONSOLE_TOKEN) to enable it"})
        if not (self.cfg.allow_remote or auth.local_client(client)):
            return Response(403, {"error": "the console answers only on this machine: "
                                  "set [console] allow_remote = true (behind TLS) to open it"})
        if req.method == "POST":
            try:
                raw = await read_body(receive, dict(req.headers), MAX_FORM_BYTES)
            except TooLarge:
                return Response(413, {"error": f"form larger than {MAX_FORM_BYTES} bytes"})
            form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"),
                                                   keep_blank_values=True).items()}
            req = attrs.evolve(req, form=form)
        try:
            return await self._route(req)
        except DatabaseError as exc:
            logger.bind(stage="console").warning("console: {}", exc)
            return Response(503, {"error": "database unavailable, retry in a moment"},
                            (("retry-after", "5"),))

    async def _route(self, req: Request) -> Response:
        if req.method == "GET" and req.path.startswith("/static/"):
            return self._static(req.path.removeprefix("/static/"))
        if req.path == "/login":
            return self._login(req)
        agent = self._agent(req)
        if agent is None:
            if req.method == "GET" and not req.wants_json:
                return _redirect(f"{PREFIX}/login")
            return Response(401, {"error": "sign in at /console/login, or send "
                                  "Authorization: Bearer <[console] token>"},
                            (("www-authenticate", "Bearer"),))
        if req.method == "POST":
            problem = self._cross_site(req, agent)
            if problem:
                logger.bind(stage="console").warning("console: refused a POST from {}: {}",
                                                     req.client, problem)
                return Response(403, {"error": problem})
        if req.path == "/logout" and req.method == "POST":
            return _redirect(f"{PREFIX}/login", ("set-cookie", self._cookie("", 0)))
        if req.path in ("", "/queue") and req.method == "GET":
            return await self._queue(req, agent) if req.path else _redirect(f"{PREFIX}/queue")
        parts = req.path.split("/")[1:]
        if len(parts) >= 2 and parts[0] == "conversations" and parts[1].isdigit():
            conv = int(parts[1])
            if len(parts) == 2 and req.method == "GET":
                return await self._conversation(req, agent, conv)
            if len(parts) == 3 and parts[2] in _ACTIONS and req.method == "POST":
                return await self._act(req, agent, conv, parts[2])
        return Response(404, {"error": f"no such page: {req.method} {PREFIX}{req.path}"})

    # --- access ----------------------------------------------------------------------------

    def _agent(self, req: Request) -> auth.Agent | None:
        given = auth.bearer(req.headers.get("authorization", ""))
        if given is not None:
            if not auth.token_ok(given, self.cfg.token):
                return None
            name = req.headers.get("x-console-agent", "script")
            return None if auth.name_problem(name) else auth.Agent(name, "bearer")
        session = auth.cookie(req.headers.get("cookie", ""))
        if not session:
            return None
        signed = auth.read_session(self.cfg.token, session, self.clock(),
                                   self.cfg.session_hours * 3600)
        return auth.Agent(signed, "session", session) if signed else None

    def _cross_site(self, req: Request, agent: auth.Agent) -> str | None:
        if not auth.same_origin(req.headers.get("origin"), req.headers.get("host")):
            return "cross-site request refused (its Origin is another site)"
        if agent.via == "session" and not auth.token_ok(
                req.form.get("csrf", ""), auth.csrf_value(self.cfg.token, agent.session)):
            return "the form is stale or from another site: reload the page and try again"
        return None

    def _cookie(self, value: str, max_age: int) -> str:
        return (f"{auth.COOKIE}={value}; Path={PREFIX}; Max-Age={max_age}; HttpOnly; "
                "SameSite=Strict")

    def _login(self, req: Request) -> Response:
        if req.method == "GET":
            return _html(200, self._page("login.html", error="", name=""))
        if req.method != "POST":
            return Response(405, {"error": "use GET or POST"})
        if not auth.same_origin(req.headers.get("origin"), req.headers.get("host")):
            return Response(403, {"error": "cross-site request refused"})
        name = req.form.get("name", "").strip()
        if not auth.token_ok(req.form.get("token", ""), self.cfg.token):
            logger.bind(stage="console").warning("console: a wrong token from {}", req.client)
            return _html(401, self._page("login.html", error="That token is not the "
                                         "console's ([console] token).", name=name))
        if problem := auth.name_problem(name):
            return _html(400, self._page("login.html", error=problem.capitalize() + ".",
                                         name=name))
        session = auth.make_session(self.cfg.token, name, int(self.clock()))
        logger.bind(stage="console").info("console: {} signed in from {}", name, req.client)
        return _redirect(f"{PREFIX}/queue", ("set-cookie", self._cookie(
            session, int(self.cfg.session_hours * 3600))))

    # --- pages -----------------------------------------------------------------------------

    def _page(self, template: str, **values: Any) -> str:
        values.setdefault("agent", None)
        values.setdefault("csrf", "")
        return self._env.get_template(template).render(
            prefix=PREFIX, refresh_s=self.cfg.refresh_s, **values)

    def _window(self, instance: str, last_at: dt.datetime | None, now: dt.datetime) -> Window:
        cfg = self.instances.get(instance)
        if cfg is None:
            return Window("none", f"instance {instance!r} is not in the config")
        return window(cfg.channel(self.dispatch).transport, last_at, now, cfg.template)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    async def _queue(self, req: Request, agent: auth.Agent) -> Response:
        waiting = await self.store.queue()
        now = self._now()
        rows = [(w, self._window(w.instance, w.last_message_at, now)) for w in waiting]
        if req.wants_json:
            return Response(200, {"open": [_waiting_json(w, win) for w, win in rows]})
        values = {"rows": rows, "now": now, "agent": agent,
                  "csrf": auth.csrf_value(self.cfg.token, agent.session)}
        if req.query.get("part") == "rows":
            return _html(200, self._page("_queue_rows.html", **values))
        return _html(200, self._page("queue.html", **values))

    async def _conversation(self, req: Request, agent: auth.Agent, conv_id: int) -> Response:
        conv = await self.store.conversation(conv_id, self.cfg.history_limit)
        if conv is None:
            return Response(404, {"error": f"no conversation {conv_id}"})
        now = self._now()
        win = self._window(conv.instance, conv.last_message_at, now)
        if req.wants_json:
            return Response(200, _conversation_json(conv, win))
        holder = conv.escalation.claimed_by if conv.escalation else None
        values = {"conv": conv, "window": win, "now": now, "agent": agent,
                  "csrf": auth.csrf_value(self.cfg.token, agent.session),
                  "may_act": conv.escalation is not None and auth.may_act(holder, agent.name),
                  "key": secrets.token_hex(16),
                  "notice": NOTICES.get(req.query.get("notice", ""), "")}
        if req.query.get("part") == "history":
            return _html(200, self._page("_history.html", **values))
        return _html(200, self._page("conversation.html", **values))

    # --- actions ---------------------------------------------------------------------------

    async def _act(self, req: Request, agent: auth.Agent, conv: int, action: str) -> Response:
        result = await self._do(req, agent, conv, action)
        logger.bind(stage="console").info("console: {} {} conversation {}: {}", agent.name,
                                          action, conv, result)
        if req.wants_json or agent.via == "bearer":
            status = {"done": 200, "already": 200, "missing": 404}.get(result, 409)
            if result in ("empty", "too long", "bad key"):
                status = 400
            return Response(status, {"conversation": conv, "action": action,
                                     "result": result,
                                     "meaning": NOTICES.get(f"{action}:{result}", result)})
        to = f"{PREFIX}/conversations/{conv}?notice={quote(f'{action}:{result}')}"
        if action == "resolve" and result == "done":
            to = f"{PREFIX}/queue"
        return _redirect(to)

    async def _do(self, req: Request, agent: auth.Agent, conv: int, action: str) -> str:
        text = req.form.get("text", "").strip()
        if action == "claim":
            return await self.store.claim(conv, agent.name,
                                          take_over=req.form.get("take_over") == "1")
        if action == "resolve":
            return await self.store.resolve(conv, agent.name)
        if not text:
            return "empty"
        if len(text) > MAX_TEXT:
            return "too long"
        if action == "note":
            return await self.store.note(conv, agent.name, text)
        nonce = req.form.get("key", "")
        if agent.via == "bearer" and not nonce:
            nonce = secrets.token_hex(16)  # a script without a key accepts a resend
        if not _NONCE.fullmatch(nonce):
            return "bad key"
        sending = [name for name, i in self.instances.items()
                   if i.channel(self.dispatch).transport != "dry"]
        result = await self.store.reply(conv, agent.name, text, f"console:{conv}:{nonce}",
                                        sending=sending)
        if result == "done" and sending:
            self.queued()  # a row that is recorded as delivered makes it look, find nothing
        return result

    def _static(self, name: str) -> Response:
        ctype = _STATIC.get(name)
        if ctype is None:
            return Response(404, {"error": f"no such file: {name}"})
        text = resources.files("pipeline.console").joinpath("static", name).read_text("utf-8")
        return Response(200, text, (("content-type", ctype),
                                    ("cache-control", "public, max-age=3600"),
                                    ("x-content-type-options", "nosniff")))


def _waiting_json(w: Waiting, win: Window) -> dict[str, Any]:
    return {"escalation_id": w.escalation_id, "conversation_id": w.conversation_id,
            "instance": w.instance, "sender": w.sender, "sender_name": w.sender_name,
            "reason": w.reason, "created_at": w.created_at.isoformat(),
            "claimed_by": w.claimed_by, "window": win.state, "window_text": win.text}


def _conversation_json(conv: Conversation, win: Window) -> dict[str, Any]:
    esc = conv.escalation
    return {"id": conv.id, "instance": conv.instance, "sender": conv.sender,
            "sender_name": conv.sender_name, "window": win.state, "window_text": win.text,
            "escalation": None if esc is None else {
                "id": esc.id, "reason": esc.reason, "claimed_by": esc.claimed_by,
                "created_at": esc.created_at.isoformat()},
            "history": [json.loads(json.dumps(attrs.asdict(e), default=str))
                        for e in conv.entries]}
