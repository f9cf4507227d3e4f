"""The ASGI edge shared by the webhook routes and the console: one response record, reading
a bounded request body, and writing a response. No routing and no decisions here."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.frozen
class Response:
    """A whole response: a dict body is sent as JSON, a str as ``text/plain`` unless a
    ``content-type`` header says otherwise."""

    status: int
    body: dict[str, Any] | str
    headers: tuple[tuple[str, str], ...] = ()


class TooLarge(Exception):
    """The request body is larger than the route accepts."""


def headers_of(scope: Scope) -> dict[str, str]:
    """The request headers, names lower-cased (a repeated header keeps its last value)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The request body; :class:`TooLarge` as soon as it is known to exceed ``limit``."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def respond(send: Send, response: Response) -> None:
    if isinstance(response.body, str):
        payload, ctype = response.body.encode(), "text/plain; charset=utf-8"
    else:
        payload, ctype = json.dumps(response.body).encode(), "application/json"
    ctype = dict(response.headers).get("content-type", ctype)
    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode()),
               *((k.encode(), v.encode()) for k, v in response.headers if k != "content-type")]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
