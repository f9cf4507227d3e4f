"""Parse webhook bodies of the two WhatsApp formats into records.

Pure code, in the sans-I/O manner of h11: a ``RawEvent`` goes in, a list of ``Parsed``
records comes out. A webhook body is untrusted input and may batch several messages and
receipts, so :func:`parse_event` never raises on it: each shape problem becomes an
``Invalid`` naming the field, the value found and where it sits in the body, and the rest
of the body is still parsed. The result always holds at least one record, so every event
has an outcome.

The webhook server decodes request bytes with :func:`decode_body`, which bounds nesting
before any parser walks the body.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from stages.records import (
    RECEIPT_RANK,
    Ignored,
    InboundMessage,
    Invalid,
    Parsed,
    RawEvent,
    Receipt,
    ReceiptStatus,
)

__all__ = [
    "BodyError",
    "InstanceDirectory",
    "check_body",
    "decode_body",
    "json_depth_ok",
    "parse_event",
]


def _names_ok(_inst: object, attribute: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    for key, name in value.items():
        if not (isinstance(name, str) and name):
            raise ValueError(f"{attribute.name}[{key!r}] must be a non-empty name, not {name!r}")


@attrs.frozen
class InstanceDirectory:
    """Which configured instance a body belongs to, by the id each format carries.

    Built once from the config; a body whose id is not here is ``Invalid`` (a webhook
    pointed at the wrong pipeline must not create conversations).
    """

    by_phone_number_id: Mapping[str, str] = attrs.field(factory=dict, validator=_names_ok)
    by_evolution_name: Mapping[str, str] = attrs.field(factory=dict, validator=_names_ok)


class BodyError(Exception):
    """A request body that is not JSON we are willing to walk; the server answers 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- request bodies -----------------------------------------------------------------------


def json_depth_ok(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests lists/objects at most ``limit`` deep (a scalar has depth 0).

    Iterative, so that a hostile body cannot exhaust the interpreter stack while we check it.
    """
    return _walk(obj, limit) != "depth"


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _walk(obj: Any, limit: int) -> str | None:
    """The first problem of a decoded body: ``depth``, ``text`` (a NUL or a lone surrogate,
    which PostgreSQL cannot store) or ``number`` (an infinite float such as ``1e400``)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            children: Any = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        elif isinstance(value, str):
            if _UNSTORABLE.search(value):
                return "text"
            continue
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "number"
            continue
        else:
            continue
        if level + 1 > limit:
            return "depth"
        stack.extend((child, level + 1) for child in children)
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def decode_body(raw: bytes, max_depth: int) -> Any:
    """Decode a webhook request body, raising :class:`BodyError` with a short reason.

    Strict JSON only (no NaN/Infinity), valid UTF-8 only, nesting bounded by ``max_depth``,
    so that what reaches the parsers and the inbox is plain, bounded JSON.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"body is not valid utf-8 at byte {exc.start}") from exc
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise BodyError(f"body is nested deeper than {max_depth} levels") from exc
    except json.JSONDecodeError as exc:
        message = exc.msg.lower().removesuffix(" at")  # some messages end in "at" already
        where = f"{message} at line {exc.lineno} column {exc.colno}"
        raise BodyError(f"body is not valid json: {where}") from exc
    except ValueError as exc:
        raise BodyError(f"body is not valid json: {str(exc).lower()}") from exc
    check_body(body, max_depth)
    return body


def check_body(body: Any, max_depth: int) -> None:
    """Raise :class:`BodyError` if a decoded body cannot be stored as it is: nested deeper
    than ``max_depth``, holding a NUL or a lone surrogate, or an infinite number. Webhook
    bodies and the bodies of recorded logs get the same checks."""
    problem = _walk(body, max_depth)
    if problem == "depth":
        raise BodyError(f"body is nested deeper than {max_depth} levels")
    if problem == "text":
        raise BodyError("body holds a NUL character or a lone surrogate (\\u0000, "
                        "\\ud800-\\udfff), which cannot be stored")
    if problem == "number":
        raise BodyError("body holds a number too large for a float (e.g. 1e400)")


# --- walking a body -----------------------------------------------------------------------


MAX_ID_CHARS = 256


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING = _Missing()


class _Bad(Exception):
    """A shape problem at one place in a body; never leaves this module."""

    def __init__(self, reason: str, where: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where


def _describe(value: Any) -> str:
    """The found value, short and JSON-flavoured, for a reason."""
    if value is _MISSING:
        return "missing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Node:
    """A value inside a body together with its path, so that errors can say where."""

    __slots__ = ("value", "where")

    def __init__(self, value: Any, where: str) -> None:
        self.value = value
        self.where = where

    @property
    def name(self) -> str:
        return self.where.rsplit(".", 1)[-1] or "body"

    @property
    def present(self) -> bool:
        return self.value is not _MISSING and self.value is not None

    def bad(self, expected: str) -> _Bad:
        return _Bad(f"{self.name} must be {expected}, not {_describe(self.value)}", self.where)

    def get(self, key: str) -> _Node:
        if not isinstance(self.value, dict):
            raise self.bad("an object")
        return _Node(self.value.get(key, _MISSING), f"{self.where}.{key}" if self.where else key)

    def items(self) -> list[_Node]:
        if not isinstance(self.value, list):
            raise self.bad("a list")
        return [_Node(item, f"{self.where}[{i}]") for i, item in enumerate(self.value)]

    def opt_items(self) -> list[_Node]:
        return self.items() if self.present else []

    def text(self) -> str:
        """A non-empty string of at most 256 characters: ids, senders, types (they are
        indexed, and PostgreSQL limits an index row to about 2.7 kB)."""
        if isinstance(self.value, str) and 0 < len(self.value) <= MAX_ID_CHARS:
            return self.value
        if isinstance(self.value, str) and self.value:
            raise _Bad(f"{self.name} must be at most {MAX_ID_CHARS} characters, not "
                       f"{len(self.value)}", self.where)
        raise self.bad("a non-empty string")

    def string(self) -> str:
        if isinstance(self.value, str):
            return self.value
        raise self.bad("a string")

    def opt_string(self) -> str | None:
        return self.string() if self.present else None

    def boolean(self) -> bool:
        if isinstance(self.value, bool):
            return self.value
        raise self.bad("true or false")

    def number(self) -> int | float:
        value = self.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return value
        raise self.bad("a number")

    def require_object(self) -> None:
        if not isinstance(self.value, dict):
            raise self.bad("an object")


# --- shared pieces ------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_UNIX = 253402300799  # 9999-12-31T23:59:59Z, the last second a datetime can hold


def _from_unix(seconds: int, node: _Node) -> dt.datetime:
    if not 0 <= seconds <= _MAX_UNIX:
        raise node.bad("a unix time in seconds")
    return _EPOCH + dt.timedelta(seconds=seconds)


def _from_digits(digits: str, node: _Node) -> dt.datetime:
    if len(digits) > 12:  # also keeps int() away from its digit limit
        raise node.bad("a unix time in seconds")
    return _from_unix(int(digits), node)


def _lookup(directory: Mapping[str, str], node: _Node) -> str:
    key = node.text()
    instance = directory.get(key)
    if instance is None:
        raise _Bad(f"unknown instance: {node.name} {_describe(key)} is not configured", node.where)
    return instance


@attrs.frozen
class _Content:
    kind: str
    text: str
    media_id: str | None = None
    reply_to: str | None = None


def _ignored(
    event: RawEvent, reason: str, instance: str | None = None, message_id: str | None = None
) -> Ignored:
    return Ignored(
        reason=reason, format=event.format, instance=instance,
        message_id=message_id, origin=event.origin,
    )


def _guarded(event: RawEvent, parse: Callable[[], Parsed | list[Parsed]]) -> list[Parsed]:
    """Run one part of a body; a shape problem in it becomes one ``Invalid`` for that part."""
    try:
        result = parse()
    except _Bad as bad:
        invalid = Invalid(reason=bad.reason, where=bad.where, format=event.format,
                          origin=event.origin)
        return [invalid]
    return result if isinstance(result, list) else [result]


def _opt_id(node: _Node) -> str | None:
    """An id used only to label an Ignored record: taken if usable, never an error."""
    return node.value if isinstance(node.value, str) and node.value else None


# --- Meta WhatsApp Cloud API --------------------------------------------------------------


def _parse_cloud(event: RawEvent, instances: InstanceDirectory) -> list[Parsed]:
    root = _Node(event.body, "")
    kind = root.get("object")
    if kind.value != "whatsapp_business_account":
        raise kind.bad("'whatsapp_business_account'")
    results: list[Parsed] = []
    for entry in root.get("entry").items():
        results += _guarded(event, functools.partial(_cloud_entry, event, entry, instances))
    return results


def _cloud_entry(event: RawEvent, entry: _Node, instances: InstanceDirectory) -> list[Parsed]:
    results: list[Parsed] = []
    for change in entry.get("changes").items():
        results += _guarded(event, functools.partial(_cloud_change, event, change, instances))
    return results


def _cloud_change(event: RawEvent, change: _Node, instances: InstanceDirectory) -> list[Parsed]:
    field = change.get("field").text()
    if field != "messages":
        return [_ignored(event, f"field: {field}")]
    value = change.get("value")
    instance = _lookup(instances.by_phone_number_id, value.get("metadata").get("phone_number_id"))
    messages = value.get("messages").opt_items()
    statuses = value.get("statuses").opt_items()
    if not messages and not statuses:
        return [_ignored(event, "no messages or statuses", instance)]
    names = _cloud_names(value.get("contacts"))
    results: list[Parsed] = []
    for message in messages:
        parse = functools.partial(_cloud_message, event, message, instance, names)
        results += _guarded(event, parse)
    for status in statuses:
        results += _guarded(event, functools.partial(_cloud_status, event, status, instance))
    return results


def _cloud_names(contacts: _Node) -> dict[str, str]:
    """Profile names by wa_id. Lenient on purpose: a name is a nicety, not worth a message."""
    names: dict[str, str] = {}
    for contact in contacts.opt_items():
        item = contact.value
        profile = item.get("profile") if isinstance(item, dict) else None
        name = profile.get("name") if isinstance(profile, dict) else None
        wa_id = item.get("wa_id") if isinstance(item, dict) else None
        if isinstance(wa_id, str) and isinstance(name, str) and name:
            names[wa_id] = name
    return names


#: Cloud API error codes worth naming (research/whatsapp-channels.md)
KNOWN_ERRORS = {131047: "outside the 24-hour window: only a template can be sent",
                131056: "too many messages to this user in a short time",
                130429: "throughput limit of the number reached"}


def _cloud_status(event: RawEvent, status: _Node, instance: str) -> Ignored:
    state = status.get("status").text()
    message_id = _opt_id(status.get("id"))
    error = _cloud_error(status.get("errors")) if state == "failed" else None
    receipt = None
    if message_id and state in RECEIPT_RANK:
        receipt = Receipt(instance, message_id, state,  # type: ignore[arg-type]
                          key=_opt_id(status.get("biz_opaque_callback_data")), error=error,
                          number=_opt_id(status.get("recipient_id")))
    reason = f"receipt: {state}" + (f" ({error})" if error else "")
    return attrs.evolve(_ignored(event, reason, instance, message_id), receipt=receipt)


def _cloud_error(errors: _Node) -> str | None:
    """``131047 outside the 24-hour window: … (Re-engagement message)``: code and title of
    the first error, lenient (a receipt is never invalid for its error's shape)."""
    items = errors.value if isinstance(errors.value, list) else []
    first = items[0] if items and isinstance(items[0], dict) else {}
    code, title = first.get("code"), first.get("title")
    if code is None and not title:
        return None
    label = str(code) if isinstance(code, int | str) else "unknown error"
    if isinstance(code, int) and code in KNOWN_ERRORS:
        label += f" {KNOWN_ERRORS[code]}"
    if isinstance(title, str) and title:
        label += f" ({title[:120]})"
    return label


def _cloud_message(
    event: RawEvent, message: _Node, instance: str, names: Mapping[str, str]
) -> InboundMessage:
    message_id = message.get("id").text()
    sender = message.get("from").text()
    sent_at = _cloud_time(message.get("timestamp"))
    kind = message.get("type").text()
    content = _CLOUD_CONTENT.get(kind, _cloud_other)(message, kind)
    return InboundMessage(
        instance=instance, message_id=message_id, sender=sender, kind=content.kind,
        text=content.text, sent_at=sent_at, received_at=event.received_at,
        format=event.format, sender_name=names.get(sender), media_id=content.media_id,
        reply_to=content.reply_to or _cloud_reply_to(message.get("context")),
        origin=event.origin,
    )


def _cloud_time(node: _Node) -> dt.datetime:
    if not (isinstance(node.value, str) and _DIGITS.fullmatch(node.value)):
        raise node.bad("a string of digits")
    return _from_digits(node.value, node)


def _cloud_reply_to(context: _Node) -> str | None:
    if not context.present:
        return None
    return context.get("id").opt_string() or None


def _cloud_text(message: _Node, kind: str) -> _Content:
    return _Content(kind, message.get("text").get("body").string())


def _cloud_media(message: _Node, kind: str) -> _Content:
    """image/audio/video/document/sticker: the caption (a document's filename if none)."""
    media = message.get(kind)
    text = media.get("caption").opt_string()
    if not text and kind == "document":
        text = media.get("filename").opt_string()
    return _Content(kind, text or "", media_id=media.get("id").text())


def _cloud_interactive(message: _Node, kind: str) -> _Content:
    interactive = message.get("interactive")
    reply_type = interactive.get("type").text()
    if reply_type in ("button_reply", "list_reply"):
        return _Content(kind, interactive.get(reply_type).get("title").string())
    return _Content(kind, "")


def _cloud_button(message: _Node, kind: str) -> _Content:
    return _Content(kind, message.get("button").get("text").string())


def _cloud_reaction(message: _Node, kind: str) -> _Content:
    """An empty or missing emoji means the reaction was removed: text ``""``."""
    reaction = message.get("reaction")
    emoji = reaction.get("emoji").opt_string() or ""
    return _Content(kind, emoji, reply_to=reaction.get("message_id").opt_string() or None)


def _place(node: _Node, lat_key: str, long_key: str) -> str:
    """A location as text: its name and address if any, else ``"lat,long"``."""
    latitude = node.get(lat_key).number()
    longitude = node.get(long_key).number()
    label = [part for part in (node.get("name").opt_string(), node.get("address").opt_string())
             if part]
    return ", ".join(label) if label else f"{latitude},{longitude}"


def _cloud_location(message: _Node, kind: str) -> _Content:
    return _Content(kind, _place(message.get("location"), "latitude", "longitude"))


def _cloud_contacts(message: _Node, kind: str) -> _Content:
    names = []
    for contact in message.get("contacts").items():
        name = contact.get("name")
        formatted = name.get("formatted_name").opt_string() if name.present else None
        if formatted:
            names.append(formatted)
    return _Content(kind, ", ".join(names))


def _cloud_other(_message: _Node, kind: str) -> _Content:
    """Unsupported and future types still reach the pipeline, as their own kind."""
    return _Content(kind, "")


_CLOUD_CONTENT: dict[str, Callable[[_Node, str], _Content]] = {
    "text": _cloud_text,
    "image": _cloud_media,
    "audio": _cloud_media,
    "video": _cloud_media,
    "document": _cloud_media,
    "sticker": _cloud_media,
    "interactive": _cloud_interactive,
    "button": _cloud_button,
    "reaction": _cloud_reaction,
    "location": _cloud_location,
    "contacts": _cloud_contacts,
}


# --- Evolution API ------------------------------------------------------------------------


def _parse_evolution(event: RawEvent, instances: InstanceDirectory) -> list[Parsed]:
    root = _Node(event.body, "")
    name = root.get("event").text()
    normal = name.lower().replace("_", ".")
    if normal not in ("messages.upsert", "send.message"):
        raw = root.get("instance").value
        known = instances.by_evolution_name.get(raw) if isinstance(raw, str) else None
        ignored = _ignored(event, f"event: {name}", known)
        if normal == "messages.update" and known:
            return [_evolution_status(ignored, root.get("data"), known)]
        return [ignored]
    instance = _lookup(instances.by_evolution_name, root.get("instance"))
    return [_evolution_upsert(event, root.get("data"), instance)]


#: Evolution's message states (Baileys' ack levels) as receipts
_EVOLUTION_STATES: dict[str, ReceiptStatus] = {
    "SERVER_ACK": "sent", "DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read",
    "ERROR": "failed"}


def _evolution_status(ignored: Ignored, data: _Node, instance: str) -> Ignored:
    """``messages.update``: the state of a message, ours when ``fromMe`` (lenient: a status
    that does not fit is an ignored event, as before)."""
    fields = data.value if isinstance(data.value, dict) else {}
    message_id = fields.get("keyId")
    state = _EVOLUTION_STATES.get(str(fields.get("status")))
    if not (isinstance(message_id, str) and message_id and state):
        return ignored
    return attrs.evolve(ignored, reason=f"receipt: {state}", message_id=message_id,
                        receipt=Receipt(instance, message_id, state))


def _evolution_echo(event: RawEvent, data: _Node, key: _Node, instance: str) -> Ignored:
    """Evolution's echo of a message sent from the number (by us, or by a person on the
    phone): what was sent to whom, so that a send whose answer was lost is recognised."""
    message_id = _opt_id(key.get("id"))
    ignored = _ignored(event, "own message (fromMe)", instance, message_id)
    jid = str(key.get("remoteJid").value or "")
    number, _, domain = jid.rpartition("@")
    if domain == "lid":  # replies to a person known only by the privacy id go to it whole
        number, domain = jid, "s.whatsapp.net"
    message = data.get("message").value
    text = None
    if isinstance(message, dict):
        extended = message.get("extendedTextMessage")
        text = message.get("conversation") or (extended.get("text")
                                               if isinstance(extended, dict) else None)
    if not message_id or domain not in ("s.whatsapp.net", "c.us") or not isinstance(text, str):
        return ignored
    return attrs.evolve(ignored, receipt=Receipt(instance, message_id, "sent", number=number,
                                                 text=text))


def _evolution_upsert(event: RawEvent, data: _Node, instance: str) -> Parsed:
    key = data.get("key")
    if key.get("fromMe").boolean():
        return _evolution_echo(event, data, key, instance)
    sender, skip = _evolution_sender(key.get("remoteJid"), _evolution_phone(key, data))
    if skip:
        return _ignored(event, skip, instance, _opt_id(key.get("id")))
    message_id = key.get("id").text()
    sent_at = _evolution_time(data.get("messageTimestamp"))
    content = _evolution_content(data)
    if isinstance(content, str):
        return _ignored(event, content, instance, message_id)
    return InboundMessage(
        instance=instance, message_id=message_id, sender=sender, kind=content.kind,
        text=content.text, sent_at=sent_at, received_at=event.received_at,
        format=event.format, sender_name=data.get("pushName").opt_string() or None,
        media_id=content.media_id, reply_to=content.reply_to, origin=event.origin,
    )


def _evolution_sender(jid: _Node, phone: str | None) -> tuple[str, str | None]:
    """The conversation key of a remoteJid, or why the message is not a 1:1 user message.

    An @lid jid gives way to ``phone``, the number sent beside it, so that a person is one
    conversation whichever of the two ids a payload carries, and replies go to the number.
    """
    value = jid.text()
    user, _, domain = value.rpartition("@")
    if user and domain in ("s.whatsapp.net", "c.us"):
        return user, None
    if user and domain == "lid":
        return phone or value, None  # without a number the whole lid is the key
    if domain == "g.us":
        return "", "group message"
    if domain in ("broadcast", "newsletter"):
        return "", f"{domain} message"
    raise jid.bad("a user jid (@s.whatsapp.net or @lid)")


#: where Evolution puts the phone number of an @lid sender (evolution-api #1872): ``senderPn``
#: (v2.3.0), later ``remoteJidAlt`` (v2.3.6), ``participantAlt`` in groups; in the key or data
_PHONE_FIELDS = ("senderPn", "remoteJidAlt", "participantAlt")
_PHONE_JID = re.compile(r"([0-9]{1,32})@(?:s\.whatsapp\.net|c\.us)")


def _evolution_phone(key: _Node, data: _Node) -> str | None:
    """The digits of the first phone jid among the alternate id fields, if any.

    Lenient on purpose, like :func:`_opt_id`: a field that is missing or not a phone jid is
    skipped, since the @lid alone still names the person.
    """
    for node in (key, data):
        fields = node.value if isinstance(node.value, dict) else {}
        for name in _PHONE_FIELDS:
            value = fields.get(name)
            if isinstance(value, str) and (match := _PHONE_JID.fullmatch(value)):
                return match[1]
    return None


def _long_seconds(value: dict[str, Any]) -> Any:
    """A protobuf Long ``{low, high, unsigned}`` (Evolution v1) as an int, else the dict."""
    low, high = value.get("low"), value.get("high", 0)
    if type(low) is int and type(high) is int:
        return (high << 32) | (low & 0xFFFFFFFF)
    return value


def _evolution_time(node: _Node) -> dt.datetime:
    value = _long_seconds(node.value) if isinstance(node.value, dict) else node.value
    if type(value) is int:
        return _from_unix(value, node)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return _from_digits(value, node)
    raise node.bad("an integer or a string of digits")


def _evolution_content(data: _Node) -> _Content | str:
    """The content of an upsert, or the reason to ignore it (protocol messages)."""
    message = data.get("message")
    message_type = _evolution_type(data.get("messageType"), message)
    if message_type in _EVOLUTION_IGNORED:
        return _EVOLUTION_IGNORED[message_type]
    handler = _EVOLUTION_CONTENT.get(message_type)
    if handler is None:
        message.require_object()
        return _Content(message_type, "")
    kind, parse = handler
    part = message.get(message_type)
    text, reply_to = parse(part)
    return _Content(kind, text, reply_to=reply_to or _evolution_reply_to(data, part))


def _evolution_type(node: _Node, message: _Node) -> str:
    """``messageType``, or when absent the first known content key of ``message``."""
    if node.present:
        return node.text()
    message.require_object()
    for known in (*_EVOLUTION_CONTENT, *_EVOLUTION_IGNORED):
        if known in message.value:
            return known
    raise node.bad("a non-empty string")


def _evolution_reply_to(data: _Node, part: _Node) -> str | None:
    """The quoted message id: v2 lifts ``contextInfo`` into data, v1 keeps it in the part."""
    contexts = [data.get("contextInfo")]
    if isinstance(part.value, dict):
        contexts.append(part.get("contextInfo"))
    for context in contexts:
        if context.present and (stanza := context.get("stanzaId").opt_string()):
            return stanza
    return None


_Part = tuple[str, str | None]  # text, reply_to


def _evo_conversation(part: _Node) -> _Part:
    return part.string(), None


def _evo_extended(part: _Node) -> _Part:
    return part.get("text").string(), None


def _evo_caption(part: _Node) -> _Part:
    return part.get("caption").opt_string() or "", None


def _evo_silent(part: _Node) -> _Part:
    part.require_object()
    return "", None


def _evo_document(part: _Node) -> _Part:
    text = part.get("caption").opt_string() or part.get("fileName").opt_string()
    return text or "", None


def _evo_document_wrapped(part: _Node) -> _Part:
    return _evo_document(part.get("message").get("documentMessage"))


def _evo_reaction(part: _Node) -> _Part:
    target = part.get("key")
    reply_to = target.get("id").opt_string() if target.present else None
    return part.get("text").opt_string() or "", reply_to or None


def _evo_location(part: _Node) -> _Part:
    return _place(part, "degreesLatitude", "degreesLongitude"), None


def _evo_contact(part: _Node) -> _Part:
    return part.get("displayName").opt_string() or "", None


def _evo_contacts(part: _Node) -> _Part:
    names = [contact.get("displayName").opt_string() for contact in part.get("contacts").items()]
    return ", ".join(name for name in names if name), None


def _evo_field(key: str) -> Callable[[_Node], _Part]:
    def parse(part: _Node) -> _Part:
        return part.get(key).opt_string() or "", None

    return parse


_EVOLUTION_CONTENT: dict[str, tuple[str, Callable[[_Node], _Part]]] = {
    "conversation": ("text", _evo_conversation),
    "extendedTextMessage": ("text", _evo_extended),
    "imageMessage": ("image", _evo_caption),
    "videoMessage": ("video", _evo_caption),
    "audioMessage": ("audio", _evo_silent),
    "stickerMessage": ("sticker", _evo_silent),
    "documentMessage": ("document", _evo_document),
    "documentWithCaptionMessage": ("document", _evo_document_wrapped),
    "reactionMessage": ("reaction", _evo_reaction),
    "locationMessage": ("location", _evo_location),
    "contactMessage": ("contacts", _evo_contact),
    "contactsArrayMessage": ("contacts", _evo_contacts),
    "buttonsResponseMessage": ("interactive", _evo_field("selectedDisplayText")),
    "listResponseMessage": ("interactive", _evo_field("title")),
    "templateButtonReplyMessage": ("button", _evo_field("selectedDisplayText")),
}

#: upserts that carry no user content: revokes, edits, ephemeral settings
_EVOLUTION_IGNORED: dict[str, str] = {"protocolMessage": "protocol message"}


# --- entry point --------------------------------------------------------------------------

_PARSERS: dict[str, Callable[[RawEvent, InstanceDirectory], list[Parsed]]] = {
    "cloud-api": _parse_cloud,
    "evolution": _parse_evolution,
}


def parse_event(event: RawEvent, instances: InstanceDirectory) -> list[Parsed]:
    """Turn one webhook body into records: user messages, ignored events, invalid parts.

    Never raises on bad input and always returns at least one record, so that every event
    gets an outcome; results keep the order of the body.
    """
    parser = _PARSERS.get(event.format) if isinstance(event.format, str) else None
    if parser is None:
        reason = f"format must be 'cloud-api' or 'evolution', not {_describe(event.format)}"
        return [Invalid(reason=reason, format=None, origin=event.origin)]
    results = _guarded(event, functools.partial(parser, event, instances))
    return results or [_ignored(event, "no messages or statuses")]
