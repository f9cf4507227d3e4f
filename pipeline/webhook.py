"""The live source: an ASGI app for both webhook formats, served by hypercorn on Trio.

Routes:

* ``GET  /webhook/cloud-api`` -- Meta's verification handshake (``hub.challenge`` or 403)
* ``POST /webhook/cloud-api`` -- Cloud API bodies, ``X-Hub-Signature-256`` checked first
* ``POST /webhook/evolution`` (and ``/webhook/evolution/<event>``) -- Evolution events,
  ``apikey`` checked first (header, or the body's own ``apikey`` field)
* ``GET  /escalations`` and ``POST /escalations/<id>/resolve``; ``GET /deadletters``,
  ``GET /deadletters/<id>``, ``POST /deadletters/<id>/retry`` and ``/discard`` --
  operators, with ``Authorization: Bearer <webhook.resolve_token>`` (off while the token
  is empty)
* ``/console`` -- the agents' console (pipeline/console/), when ``[console] token`` is set
* ``GET  /healthz`` -- alive (answers as long as the process runs)
* ``GET  /readyz`` -- 200 when the database answers, its migrations are current and the
  process is not shutting down; 503 with the problems otherwise
* ``GET  /metrics`` -- Prometheus text format (:mod:`pipeline.prometheus`)

Order of checks for a POST: size (413) → credentials (401, :func:`credentials_problem`) →
JSON (400 + dead letter) →
parse (400 + dead letter when nothing in the body is usable) → inbox write (503 with
Retry-After when it cannot be done) → 200. A 200 therefore always means "stored"; a
redelivery is stored already and answered 200 at once. Stored messages are then handed to
the pipeline; a full pipeline slows the acknowledgement (backpressure), it never drops.

The copy in ``record_dir`` is a convenience for later replays, never a condition of the
acknowledgement: when it cannot be written (full disk, bad folder) the message still goes on,
the failure is counted (``stats.counters["record_dir errors"]``) and logged as a warning --
once per distinct reason, then at most every :data:`RECORD_WARN_EVERY_S` seconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast
from urllib.parse import parse_qs

import attrs
import trio
from loguru import logger

from pipeline.asgi import Receive, Response, Scope, Send, TooLarge, headers_of, read_body, respond
from pipeline.config import WebhookConfig
from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.deadletters import MEANING, DeadLetters
from pipeline.intake import LiveIntake
from pipeline.metrics import StageMetrics
from pipeline.prometheus import CONTENT_TYPE, Exporter
from pipeline.recorded_log import LogRecorder
from stages.intake import Accepted, redact_body
from stages.parse import BodyError, decode_body
from stages.records import Format, Invalid, RawEvent

RETRY_AFTER_S = 5
READ_TIMEOUT_S = 10
#: a record_dir failure that keeps happening is logged again at most this often
RECORD_WARN_EVERY_S = 60.0
_KEPT_HEADERS = ("content-type", "user-agent", "x-hub-signature-256")


def cloud_signature_ok(raw: bytes, header: str | None, app_secret: str) -> bool:
    """``X-Hub-Signature-256: sha256=<hex HMAC of the raw body>``, compared in constant time."""
    if header is None:
        return False
    expected = "sha256=" + hmac.new(app_secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().encode())


def apikey_ok(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


#: ``credentials_problem``'s body before it is read
UNREAD = object()


def credentials_problem(fmt: Format, cfg: WebhookConfig, headers: Mapping[str, str],
                        raw: bytes, body: object = UNREAD) -> str | None:
    """Why a webhook POST is refused for its credentials (401, nothing kept), or None.

    Asked before the body is decoded (``body`` is :data:`UNREAD`), then again with the
    decoded body (or its :class:`BodyError`): each credential is checked once, as early as
    it can be, so that a request without valid credentials costs no parsing when it can be
    refused without. Cloud API: ``X-Hub-Signature-256`` must be the HMAC of the raw body
    (when ``app_secret`` is set). Evolution (when ``evolution_apikey`` is set): the
    ``apikey`` header, else the body's own ``apikey`` field; an undecodable body without
    the header has no credentials we could check.
    """
    before = body is UNREAD
    if fmt == "cloud-api":
        if before and cfg.app_secret and not cloud_signature_ok(
                raw, headers.get("x-hub-signature-256"), cfg.app_secret):
            return "x-hub-signature-256 does not match the body"
        return None
    if not cfg.evolution_apikey:
        return None
    given = headers.get("apikey")
    if given is None:
        if before:
            return None  # the body's own field decides
        given = body.get("apikey") if isinstance(body, dict) else None
    elif not before:
        return None  # the header was checked already
    return None if apikey_ok(given, cfg.evolution_apikey) else "apikey is missing or wrong"


def verification(query: str, verify_token: str) -> Response:
    """Meta's GET handshake: echo ``hub.challenge`` when mode and token match."""
    args = {k: v[0] for k, v in parse_qs(query).items()}
    token = args.get("hub.verify_token", "")
    if (verify_token and args.get("hub.mode") == "subscribe"
            and apikey_ok(token, verify_token) and "hub.challenge" in args):
        return Response(200, args["hub.challenge"])
    return Response(403, {"error": "verification failed: wrong hub.mode or hub.verify_token"})


@attrs.define
class WebhookApp:
    """The ASGI application. ``handover`` receives what was accepted (into the pipeline)."""

    cfg: WebhookConfig
    intake: LiveIntake
    handover: Callable[[Accepted], Awaitable[None]]
    stats: StageMetrics
    recorder: LogRecorder | None = None
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    #: ``GET /metrics`` (None: 404) and the problems ``GET /readyz`` reports (none: ready)
    exporter: Exporter | None = None
    readiness: Callable[[], Awaitable[list[str]]] | None = None
    #: the agents' console (``/console``); None: 404
    console: Callable[[Scope, Receive], Awaitable[Response]] | None = None
    _record_warning: tuple[str, float] | None = attrs.field(default=None, init=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if self.console is not None and (scope["path"] == "/console"
                                         or scope["path"].startswith("/console/")):
            await respond(send, await self.console(scope, receive))  # not a webhook: no stats
            return
        start = time.perf_counter()
        response = await self._route(scope, receive)
        await respond(send, response)
        self.stats.latency.record((time.perf_counter() - start) * 1000)
        self.stats.sent += 1
        if response.status >= 400:
            self.stats.errors += 1

    async def _route(self, scope: Scope, receive: Receive) -> Response:
        method, path = scope["method"], scope["path"].rstrip("/")
        self.stats.received += 1
        if path == "/healthz":
            return Response(200, {"status": "ok"})
        if path == "/readyz":
            why = await self.readiness() if self.readiness is not None else []
            return Response(503 if why else 200,
                            {"status": "not ready", "problems": why} if why else
                            {"status": "ready"})
        if path == "/metrics" and self.exporter is not None:
            return Response(200, (await self.exporter.page()).decode(),
                            (("content-type", CONTENT_TYPE),))
        if path == "/escalations" or path.startswith("/escalations/"):
            return await self._escalations(method, path, headers_of(scope))
        if path == "/deadletters" or path.startswith("/deadletters/"):
            return await self._operator(method, path, headers_of(scope), self._deadletters)
        if path == "/webhook/cloud-api" and method == "GET":
            return verification(scope.get("query_string", b"").decode("latin-1"),
                                 self.cfg.verify_token)
        fmt: Format | None = ("cloud-api" if path == "/webhook/cloud-api" else
                              "evolution" if path.split("/")[1:3] == ["webhook", "evolution"]
                              else None)
        if fmt is None:
            return Response(404, {"error": f"no such endpoint: {path}"})
        if method != "POST":
            return Response(405, {"error": f"{method} not allowed here: use POST"},
                            (("allow", "POST"),))
        return await self._post(fmt, scope, receive)

    async def _post(self, fmt: Format, scope: Scope, receive: Receive) -> Response:
        headers = headers_of(scope)
        try:
            raw = await read_body(receive, headers, self.cfg.max_body_bytes)
        except TooLarge:
            return Response(413, {"error": f"body larger than {self.cfg.max_body_bytes} bytes"},
                            (("connection", "close"),))  # the rest of the body is not read
        refused = credentials_problem(fmt, self.cfg, headers, raw)
        if refused is not None:
            return _refused(scope, refused)
        try:
            body: Any = decode_body(raw, self.cfg.max_json_depth)
        except BodyError as exc:
            body = exc
        refused = credentials_problem(fmt, self.cfg, headers, raw, body)
        if refused is not None:
            return _refused(scope, refused)
        if isinstance(body, BodyError):
            await self._dead_letter(Invalid(body.reason, format=fmt), raw)
            return Response(400, {"error": body.reason})
        event = RawEvent(self.clock(), fmt, body,
                         {k: v for k, v in headers.items() if k in _KEPT_HEADERS})
        return await self._accept(event)

    async def _accept(self, event: RawEvent) -> Response:
        try:
            accepted = await self.intake.accept(event)
        except DatabaseUnavailable as exc:
            logger.bind(stage="webhook").warning("inbox unavailable, answering 503: {}", exc)
            return Response(503, {"error": "inbox unavailable, retry later"},
                            (("retry-after", str(RETRY_AFTER_S)),))
        except DatabaseError as exc:  # the data cannot be stored: retrying will not help
            reason = f"message cannot be stored: {exc}"
            await self._dead_letter(Invalid(reason, format=event.format),
                                    json.dumps(redact_body(event.body)).encode())
            return Response(400, {"error": reason})
        if self.recorder is not None:
            self._record(self.recorder, event)
        if accepted.all_invalid:
            reasons = [f"{i.reason} (at {i.where})" if i.where else i.reason
                       for i in accepted.invalid]
            await self.handover(accepted)
            return Response(400, {"error": "; ".join(reasons)})
        await self.handover(accepted)
        return Response(200, {
            "stored": sum(not s.redelivered for s in accepted.stored),
            "duplicates": sum(s.redelivered for s in accepted.stored),
            "ignored": len(accepted.finished) - len(accepted.invalid),
            "invalid": len(accepted.invalid),
        })

    def _record(self, recorder: LogRecorder, event: RawEvent) -> None:
        """Append the (redacted) body to ``record_dir``; a failure costs only the copy."""
        try:
            recorder.write(attrs.evolve(event, body=redact_body(event.body)))
        except OSError as exc:
            self.stats.counters["record_dir errors"] += 1
            self._warn_record_error(str(exc))
            return
        if self._record_warning is not None:
            self._record_warning = None
            logger.bind(stage="webhook").info("record_dir is written again")

    def _warn_record_error(self, reason: str) -> None:
        now = trio.current_time()
        last = self._record_warning
        if last is not None and last[0] == reason and now - last[1] < RECORD_WARN_EVERY_S:
            return
        self._record_warning = (reason, now)
        logger.bind(stage="webhook").warning(
            "cannot record intake (the message is stored and goes on): {} "
            "[{} record_dir errors so far]", reason, self.stats.counters["record_dir errors"])

    async def _operator(self, method: str, path: str, headers: dict[str, str],
                        then: Callable[[str, str], Awaitable[Response]]) -> Response:
        """The operators' endpoints: off without ``resolve_token``, else its bearer token."""
        token = self.cfg.resolve_token
        if not token:
            return Response(404, {"error": "operator endpoints are off: set "
                                  "[webhook] resolve_token to enable them"})
        given = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not apikey_ok(given, token):
            return Response(401, {"error": "authorization: Bearer <resolve_token> required"},
                            (("www-authenticate", "Bearer"),))
        return await then(method, path)

    async def _deadletters(self, method: str, path: str) -> Response:
        """``GET /deadletters[?all]``, ``GET /deadletters/<id>``, ``POST
        /deadletters/<id>/retry`` and ``/discard`` (pipeline/deadletters.py)."""
        store = self.intake.store
        letters = DeadLetters(store.pool, store.query_timeout_s)
        parts = path.split("/")
        try:
            if method == "GET" and path == "/deadletters":
                return Response(200, {"dead_letters": [d.summary() for d in await letters.list()]})
            if method == "GET" and len(parts) == 3 and parts[2].isdigit():
                letter = await letters.show(int(parts[2]))
                return (Response(200, letter.whole()) if letter else
                        Response(404, {"error": f"no dead letter {parts[2]}"}))
            if method == "POST" and len(parts) == 4 and parts[2].isdigit() \
                    and parts[3] in ("retry", "discard"):
                act = letters.retry if parts[3] == "retry" else letters.discard
                verdict = await act(int(parts[2]), "http")
                status = {"retried": 200, "discarded": 200, "missing": 404}.get(verdict, 409)
                return Response(status, {"id": int(parts[2]), "result": verdict,
                                         "meaning": MEANING[verdict]})
        except DatabaseError as exc:
            logger.bind(stage="webhook").warning("dead letters endpoint: {}", exc)
            return Response(503, {"error": "database unavailable, retry later"},
                            (("retry-after", str(RETRY_AFTER_S)),))
        return Response(404, {"error": f"no such endpoint: {method} {path}"})

    async def _escalations(self, method: str, path: str, headers: dict[str, str]) -> Response:
        return await self._operator(method, path, headers, self._resolve)

    async def _resolve(self, method: str, path: str) -> Response:
        store = self.intake.store
        parts = path.split("/")
        try:
            if method == "GET" and path == "/escalations":
                return Response(200, {"open": [
                    {"id": e.id, "instance": e.instance, "sender": e.sender,
                     "reason": e.reason, "created_at": e.created_at.isoformat()}
                    for e in await store.open_escalations()]})
            if method == "POST" and len(parts) == 4 and parts[3] == "resolve" \
                    and parts[2].isdigit():
                if await store.resolve_escalation(int(parts[2]), "http"):
                    return Response(200, {"resolved": int(parts[2])})
                return Response(404, {"error": f"no open escalation {parts[2]}"})
        except DatabaseError as exc:
            logger.bind(stage="webhook").warning("escalations endpoint: {}", exc)
            return Response(503, {"error": "database unavailable, retry later"},
                            (("retry-after", str(RETRY_AFTER_S)),))
        return Response(404, {"error": f"no such endpoint: {method} {path}"})

    async def _dead_letter(self, invalid: Invalid, raw: bytes) -> None:
        text = raw[:65536].decode("utf-8", "replace").replace("\x00", "\\u0000")
        if self.cfg.evolution_apikey:  # never keep a credential, even in a broken body
            text = text.replace(self.cfg.evolution_apikey, "***")
        try:
            await self.intake.store.dead_letter("webhook", invalid, text)
        except DatabaseError as exc:
            logger.bind(stage="webhook").warning("could not record a dead letter: {}", exc)


def _refused(scope: Scope, reason: str) -> Response:
    client = scope.get("client") or ("?", 0)
    logger.bind(stage="webhook").warning("401 for {}:{} {}: {}", client[0], client[1],
                                         scope.get("path", ""), reason)
    return Response(401, {"error": reason})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve(app: WebhookApp, host: str, port: int, *, grace_s: float,
                stopping: trio.Event,
                task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``stopping`` is set, then finish in-flight requests (up to
    ``grace_s``). ``task_status.started`` gets the bound URL (port 0 picks a free one)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.trio import serve as hypercorn_serve

    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = grace_s
    config.read_timeout = READ_TIMEOUT_S  # a client that stops mid-request is cut off
    config.accesslog = None
    config.errorlog = None
    config.include_server_header = False

    async def started(task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn_serve(cast(Any, app), config, shutdown_trigger=stopping.wait,
                              task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        url = binds[0]
        logger.bind(stage="webhook").info("webhook server listening on {}", url)
        task_status.started(url)
