"""Small pieces for the fake HTTP servers the tests run under hypercorn."""

from __future__ import annotations

from typing import Any


async def read_request(scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
    """Serve the lifespan protocol (then return None) or read an HTTP request's body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body
