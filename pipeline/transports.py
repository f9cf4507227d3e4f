"""Sending one outbox row: the request each transport makes, and what its answer means.

Sans-I/O first (h11's way): :func:`build_request` turns a row into an :class:`HttpRequest`
and :func:`classify` turns a status and headers into a :class:`SendResult`, both pure and
tested without a server. :class:`Sender` does the one HTTP call in between, bounded by
``dispatch.timeout_s`` as a whole (httpx's own timeout is per network operation, so a server
that trickles bytes could outlast it).

A send never raises for an HTTP-level problem: timeouts, refused connections and error
statuses all become a result, ``retry`` (the receiver may recover: timeout, connection
error, 408, 429, 5xx) or ``final`` (it will refuse again: other 4xx, a row that cannot be
sent). The API key and webhook secrets never appear in a result's text: they are masked in
anything a server echoes back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import httpx
import trio

from pipeline.config import Channel, DispatchConfig, InstanceConfig
from pipeline.outbox import OutboxRow

Verdict = Literal["delivered", "retry", "final"]

#: how much of an error response's body a result keeps (for last_error and dead letters)
BODY_EXCERPT_CHARS = 200
_RETRYABLE_STATUS = frozenset({408, 429})
_RETRY_AFTER_STATUS = frozenset({429, 503})


@attrs.frozen
class SendResult:
    """What one send achieved. ``detail`` is short and safe to store and log."""

    verdict: Verdict
    detail: str
    status: int | None = None
    retry_after_s: float | None = None  # the receiver's Retry-After, already capped
    #: the channel's id of the message sent (from the answer), when it gave one
    provider_id: str | None = None
    #: the request may have landed although no answer says so (a timeout, a lost answer)
    in_doubt: bool = False


@attrs.frozen
class HttpRequest:
    """One POST, fully decided: the exact body bytes are what a webhook signature covers."""

    url: str
    headers: dict[str, str]
    body: bytes


class UnsendableRow(Exception):
    """The row cannot be turned into a request (missing text, unknown instance, ...)."""


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def signature(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of the body>``: how a customer checks an event came from us."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _text(row: OutboxRow) -> str:
    text = row.payload.get("text")
    if not isinstance(text, str) or not text:
        raise UnsendableRow(f"outbox row {row.idempotency_key}: payload has no text")
    return text


def evolution_request(row: OutboxRow, channel: Channel,
                      instance: InstanceConfig) -> HttpRequest:
    """Evolution API ``sendText`` with the instance's ``apikey`` (answers 201 Created)."""
    url = f"{channel.base_url.rstrip('/')}/message/sendText/{instance.evolution_instance}"
    return HttpRequest(url, {"apikey": channel.api_key, "content-type": "application/json"},
                       _json_bytes({"number": row.target, "text": _text(row)}))


def cloud_request(row: OutboxRow, channel: Channel, instance: InstanceConfig) -> HttpRequest:
    """Cloud API ``/<phone_number_id>/messages`` with a text message and the number's token."""
    if not instance.phone_number_id:
        raise UnsendableRow(f"instance {instance.name!r} has no phone_number_id for cloud-api")
    url = f"{channel.base_url.rstrip('/')}/{instance.phone_number_id}/messages"
    body = {"messaging_product": "whatsapp", "to": row.target, "type": "text",
            "text": {"body": _text(row)},
            # echoed in the status webhooks of this message: a send whose answer was lost
            # is recognised by it (pipeline/delivery.py)
            "biz_opaque_callback_data": row.idempotency_key[:512]}
    return HttpRequest(url, {"authorization": f"Bearer {channel.api_key}",
                             "content-type": "application/json"}, _json_bytes(body))


def webhook_request(row: OutboxRow, instance: InstanceConfig) -> HttpRequest:
    """The customer's webhook: the payload, signed with the instance's secret when it has one."""
    body = _json_bytes(row.payload)
    headers = {"content-type": "application/json", "idempotency-key": row.idempotency_key}
    event = row.payload.get("event")
    if isinstance(event, str) and event:
        headers["x-pipeline-event"] = event
    if instance.webhook_secret:
        headers["x-pipeline-signature"] = signature(body, instance.webhook_secret)
    return HttpRequest(row.target, headers, body)


#: WhatsApp's customer-service window: free-form messages only this long after the user's last
WINDOW_S = 24 * 3600.0

Window = Literal["free-form", "template", "refused"]


def window(row: OutboxRow, channel: Channel, instance: InstanceConfig) -> Window:
    """What the 24-hour window allows (Cloud API): a message to a user whose last message is
    older goes out as the instance's template, or not at all -- a free-form one would be
    accepted and then fail with 131047. Evolution (WhatsApp Web) has no such window."""
    if (channel.transport != "cloud-api" or not row.to_user or row.inbound_age_s is None
            or row.inbound_age_s < WINDOW_S):
        return "free-form"
    return "template" if instance.template else "refused"


def cloud_template_request(row: OutboxRow, channel: Channel,
                           instance: InstanceConfig) -> HttpRequest:
    """The instance's approved template, instead of a free-form message outside the window."""
    request = cloud_request(row, channel, instance)
    body = json.loads(request.body)
    del body["text"]
    body.update(type="template", template={"name": instance.template,
                                           "language": {"code": instance.template_language}})
    return attrs.evolve(request, body=_json_bytes(body))


def build_request(row: OutboxRow, channel: Channel, instance: InstanceConfig) -> HttpRequest:
    """The request for ``row`` on the instance's ``channel`` (``dry`` sends nothing)."""
    if row.kind == "webhook":
        return webhook_request(row, instance)
    if channel.transport == "evolution":
        return evolution_request(row, channel, instance)
    if channel.transport == "cloud-api":
        if window(row, channel, instance) == "template":
            return cloud_template_request(row, channel, instance)
        return cloud_request(row, channel, instance)
    raise UnsendableRow(f"transport {channel.transport!r} sends nothing")


def retry_after(value: str | None, cap_s: float) -> float | None:
    """A ``Retry-After`` in seconds, capped at ``cap_s``; ``None`` when absent or not a
    number of seconds (the HTTP-date form falls back to our own backoff)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap_s)


def classify(status: int, headers: Mapping[str, str], body: str,
             retry_after_cap_s: float) -> SendResult:
    """What an HTTP answer means for the row: delivered, retry later, or give up."""
    if 200 <= status < 300:
        return SendResult("delivered", f"http {status}", status, provider_id=sent_id(body))
    excerpt = body.strip()[:BODY_EXCERPT_CHARS]
    detail = f"http {status}: {excerpt}" if excerpt else f"http {status}"
    wait = (retry_after(headers.get("retry-after"), retry_after_cap_s)
            if status in _RETRY_AFTER_STATUS else None)
    if status >= 500 or status in _RETRYABLE_STATUS or cloud_error_code(body) in _SLOW_DOWN:
        return SendResult("retry", detail, status, wait)
    return SendResult("final", detail, status)


#: Cloud API errors that mean "later": the number's throughput (130429), too many messages to
#: one user in a short time (131056)
_SLOW_DOWN = frozenset({130429, 131056})


def cloud_error_code(body: str) -> int | None:
    """The ``error.code`` of a Cloud API error answer, if it is one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) else None


def sent_id(body: str) -> str | None:
    """The id a channel gave the message it accepted: Evolution ``{"key": {"id"}}``, Cloud
    API ``{"messages": [{"id"}]}``; None when the answer has none."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    key, messages = data.get("key"), data.get("messages")
    found = (key.get("id") if isinstance(key, dict) else None) or (
        messages[0].get("id") if isinstance(messages, list) and messages
        and isinstance(messages[0], dict) else None)
    return found if isinstance(found, str) and 0 < len(found) <= 256 else None


def _why(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@attrs.frozen
class Sender:
    """Sends rows with one shared client (its connection pool is reused across sends)."""

    dispatch: DispatchConfig
    instances: Mapping[str, InstanceConfig]
    client: httpx.AsyncClient

    async def send(self, row: OutboxRow) -> SendResult:
        """Send ``row`` once, within ``dispatch.timeout_s``; never raises for HTTP trouble."""
        instance = self.instances.get(row.instance)
        if instance is None:
            return SendResult("final", f"instance {row.instance!r} is not configured")
        channel = instance.channel(self.dispatch)
        if channel.transport == "dry":
            return SendResult("delivered", "dry transport: recorded, not sent")
        if window(row, channel, instance) == "refused":
            hours = (row.inbound_age_s or 0) / 3600
            return SendResult("final", f"outside the 24-hour window: the user last wrote "
                              f"{hours:.1f} h ago and [[instances]] {instance.name} has no "
                              "template; a free-form message would fail with 131047")
        try:
            request = build_request(row, channel, instance)
        except UnsendableRow as exc:
            return SendResult("final", str(exc))
        secrets = (channel.api_key, self.dispatch.api_key, instance.webhook_secret)
        result = await self._post(request, secrets)
        return attrs.evolve(result, detail=_mask(result.detail, secrets))

    async def _post(self, request: HttpRequest, secrets: tuple[str, ...]) -> SendResult:
        limit = self.dispatch.timeout_s
        with trio.move_on_after(limit):
            try:
                response = await self.client.post(request.url, content=request.body,
                                                  headers=request.headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
                return SendResult("retry", f"connection error: {_why(exc) or 'timeout'}")
            except httpx.TimeoutException:
                return SendResult("retry", f"timeout after {limit} s", in_doubt=True)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                return SendResult("final", f"bad target url: {exc}")
            except httpx.TransportError as exc:  # the request may have landed
                return SendResult("retry", f"connection error: {_why(exc)}", in_doubt=True)
            except httpx.HTTPError as exc:  # e.g. an undecodable answer: it may have landed
                return SendResult("retry", f"request failed: {_why(exc)}", in_doubt=True)
            # masked before it is cut short, so no prefix of a secret survives the cut
            return classify(response.status_code, response.headers,
                            _mask(response.text, secrets), self.dispatch.backoff_max_s)
        return SendResult("retry", f"timeout after {limit} s", in_doubt=True)
