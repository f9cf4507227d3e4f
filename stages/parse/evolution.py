"""Evolution API events: ``messages.upsert`` and ``send.message`` carry a message (or the echo
of one sent from the number), ``messages.update`` a message's state; others are ignored.

Evolution relays Baileys, so a message's content sits under a key named after its type
(``imageMessage``), and v1 and v2 put some fields in different places.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from stages.parse.fields import DIGITS, Content, from_digits, from_unix, lookup, opt_id, place
from stages.parse.results import ignored
from stages.parse.shape import Node
from stages.records import Ignored, InboundMessage, Parsed, RawEvent, Receipt, ReceiptStatus


def parse_evolution(event: RawEvent, instances: Mapping[str, str]) -> list[Parsed]:
    """The record of an Evolution event; ``instances`` maps an instance name to its instance."""
    root = Node(event.body, "")
    name = root.get("event").text()
    normal = name.lower().replace("_", ".")
    if normal not in ("messages.upsert", "send.message"):
        raw = root.get("instance").value
        known = instances.get(raw) if isinstance(raw, str) else None
        skipped = ignored(event, f"event: {name}", known)
        if normal == "messages.update" and known:
            return [_status(skipped, root.get("data"), known)]
        return [skipped]
    instance = lookup(instances, root.get("instance"))
    return [_upsert(event, root.get("data"), instance)]


#: Evolution's message states (Baileys' ack levels) as receipts
_STATES: dict[str, ReceiptStatus] = {
    "SERVER_ACK": "sent", "DELIVERY_ACK": "delivered", "READ": "read", "PLAYED": "read",
    "ERROR": "failed"}


def _status(skipped: Ignored, data: Node, instance: str) -> Ignored:
    """``messages.update``: the state of a message, ours when ``fromMe`` (lenient: a status
    that does not fit is an ignored event, as before)."""
    fields = data.value if isinstance(data.value, dict) else {}
    message_id = fields.get("keyId")
    state = _STATES.get(str(fields.get("status")))
    if not (isinstance(message_id, str) and message_id and state):
        return skipped
    return attrs.evolve(skipped, reason=f"receipt: {state}", message_id=message_id,
                        receipt=Receipt(instance, message_id, state))


def _echo(event: RawEvent, data: Node, key: Node, instance: str) -> Ignored:
    """Evolution's echo of a message sent from the number (by us, or by a person on the
    phone): what was sent to whom, so that a send whose answer was lost is recognised."""
    message_id = opt_id(key.get("id"))
    skipped = ignored(event, "own message (fromMe)", instance, message_id)
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
        return skipped
    return attrs.evolve(skipped, receipt=Receipt(instance, message_id, "sent", number=number,
                                                 text=text))


def _upsert(event: RawEvent, data: Node, instance: str) -> Parsed:
    key = data.get("key")
    if key.get("fromMe").boolean():
        return _echo(event, data, key, instance)
    sender, skip = _sender(key.get("remoteJid"), _phone(key, data))
    if skip:
        return ignored(event, skip, instance, opt_id(key.get("id")))
    message_id = key.get("id").text()
    sent_at = _time(data.get("messageTimestamp"))
    content = _content(data)
    if isinstance(content, str):
        return ignored(event, content, instance, message_id)
    return InboundMessage(
        instance=instance, message_id=message_id, sender=sender, kind=content.kind,
        text=content.text, sent_at=sent_at, received_at=event.received_at,
        format=event.format, sender_name=data.get("pushName").opt_string() or None,
        media_id=content.media_id, reply_to=content.reply_to, origin=event.origin,
    )


def _sender(jid: Node, phone: str | None) -> tuple[str, str | None]:
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


def _phone(key: Node, data: Node) -> str | None:
    """The digits of the first phone jid among the alternate id fields, if any.

    Lenient on purpose, like :func:`~stages.parse.fields.opt_id`: a field that is missing or
    not a phone jid is skipped, since the @lid alone still names the person.
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


def _time(node: Node) -> dt.datetime:
    value = _long_seconds(node.value) if isinstance(node.value, dict) else node.value
    if type(value) is int:
        return from_unix(value, node)
    if isinstance(value, str) and DIGITS.fullmatch(value):
        return from_digits(value, node)
    raise node.bad("an integer or a string of digits")


# --- content by message type --------------------------------------------------------------


def _content(data: Node) -> Content | str:
    """The content of an upsert, or the reason to ignore it (protocol messages)."""
    message = data.get("message")
    message_type = _type(data.get("messageType"), message)
    if message_type in _IGNORED:
        return _IGNORED[message_type]
    handler = _CONTENT.get(message_type)
    if handler is None:
        message.require_object()
        return Content(message_type, "")
    kind, parse = handler
    part = message.get(message_type)
    text, reply_to = parse(part)
    return Content(kind, text, reply_to=reply_to or _reply_to(data, part))


def _type(node: Node, message: Node) -> str:
    """``messageType``, or when absent the first known content key of ``message``."""
    if node.present:
        return node.text()
    message.require_object()
    for known in (*_CONTENT, *_IGNORED):
        if known in message.value:
            return known
    raise node.bad("a non-empty string")


def _reply_to(data: Node, part: Node) -> str | None:
    """The quoted message id: v2 lifts ``contextInfo`` into data, v1 keeps it in the part."""
    contexts = [data.get("contextInfo")]
    if isinstance(part.value, dict):
        contexts.append(part.get("contextInfo"))
    for context in contexts:
        if context.present and (stanza := context.get("stanzaId").opt_string()):
            return stanza
    return None


_Part = tuple[str, str | None]  # text, reply_to


def _conversation(part: Node) -> _Part:
    return part.string(), None


def _extended(part: Node) -> _Part:
    return part.get("text").string(), None


def _caption(part: Node) -> _Part:
    return part.get("caption").opt_string() or "", None


def _silent(part: Node) -> _Part:
    part.require_object()
    return "", None


def _document(part: Node) -> _Part:
    text = part.get("caption").opt_string() or part.get("fileName").opt_string()
    return text or "", None


def _document_wrapped(part: Node) -> _Part:
    return _document(part.get("message").get("documentMessage"))


def _reaction(part: Node) -> _Part:
    target = part.get("key")
    reply_to = target.get("id").opt_string() if target.present else None
    return part.get("text").opt_string() or "", reply_to or None


def _location(part: Node) -> _Part:
    return place(part, "degreesLatitude", "degreesLongitude"), None


def _contact(part: Node) -> _Part:
    return part.get("displayName").opt_string() or "", None


def _contacts(part: Node) -> _Part:
    names = [contact.get("displayName").opt_string() for contact in part.get("contacts").items()]
    return ", ".join(name for name in names if name), None


def _field(key: str) -> Callable[[Node], _Part]:
    def parse(part: Node) -> _Part:
        return part.get(key).opt_string() or "", None

    return parse


_CONTENT: dict[str, tuple[str, Callable[[Node], _Part]]] = {
    "conversation": ("text", _conversation),
    "extendedTextMessage": ("text", _extended),
    "imageMessage": ("image", _caption),
    "videoMessage": ("video", _caption),
    "audioMessage": ("audio", _silent),
    "stickerMessage": ("sticker", _silent),
    "documentMessage": ("document", _document),
    "documentWithCaptionMessage": ("document", _document_wrapped),
    "reactionMessage": ("reaction", _reaction),
    "locationMessage": ("location", _location),
    "contactMessage": ("contacts", _contact),
    "contactsArrayMessage": ("contacts", _contacts),
    "buttonsResponseMessage": ("interactive", _field("selectedDisplayText")),
    "listResponseMessage": ("interactive", _field("title")),
    "templateButtonReplyMessage": ("button", _field("selectedDisplayText")),
}

#: upserts that carry no user content: revokes, edits, ephemeral settings
_IGNORED: dict[str, str] = {"protocolMessage": "protocol message"}
