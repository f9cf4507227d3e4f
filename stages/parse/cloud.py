"""Meta's WhatsApp Cloud API bodies: entries of changes, each with messages and statuses.

A body may batch several of each; every one is parsed on its own (``results.guarded``), so a
bad message becomes one ``Invalid`` and the rest still reach the pipeline.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping

import attrs

from stages.parse.fields import DIGITS, Content, from_digits, lookup, opt_id, place
from stages.parse.results import guarded, ignored
from stages.parse.shape import Node
from stages.records import RECEIPT_RANK, Ignored, InboundMessage, Parsed, RawEvent, Receipt


def parse_cloud(event: RawEvent, instances: Mapping[str, str]) -> list[Parsed]:
    """The records of a Cloud API body; ``instances`` maps a phone_number_id to its instance."""
    root = Node(event.body, "")
    kind = root.get("object")
    if kind.value != "whatsapp_business_account":
        raise kind.bad("'whatsapp_business_account'")
    results: list[Parsed] = []
    for entry in root.get("entry").items():
        results += guarded(event, functools.partial(_entry, event, entry, instances))
    return results


def _entry(event: RawEvent, entry: Node, instances: Mapping[str, str]) -> list[Parsed]:
    results: list[Parsed] = []
    for change in entry.get("changes").items():
        results += guarded(event, functools.partial(_change, event, change, instances))
    return results


def _change(event: RawEvent, change: Node, instances: Mapping[str, str]) -> list[Parsed]:
    field = change.get("field").text()
    if field != "messages":
        return [ignored(event, f"field: {field}")]
    value = change.get("value")
    instance = lookup(instances, value.get("metadata").get("phone_number_id"))
    messages = value.get("messages").opt_items()
    statuses = value.get("statuses").opt_items()
    if not messages and not statuses:
        return [ignored(event, "no messages or statuses", instance)]
    names = _names(value.get("contacts"))
    results: list[Parsed] = []
    for message in messages:
        results += guarded(event, functools.partial(_message, event, message, instance, names))
    for status in statuses:
        results += guarded(event, functools.partial(_status, event, status, instance))
    return results


def _names(contacts: Node) -> dict[str, str]:
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


def _status(event: RawEvent, status: Node, instance: str) -> Ignored:
    state = status.get("status").text()
    message_id = opt_id(status.get("id"))
    error = _error(status.get("errors")) if state == "failed" else None
    receipt = None
    if message_id and state in RECEIPT_RANK:
        receipt = Receipt(instance, message_id, state,  # type: ignore[arg-type]
                          key=opt_id(status.get("biz_opaque_callback_data")), error=error,
                          number=opt_id(status.get("recipient_id")))
    reason = f"receipt: {state}" + (f" ({error})" if error else "")
    return attrs.evolve(ignored(event, reason, instance, message_id), receipt=receipt)


def _error(errors: Node) -> str | None:
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


def _message(
    event: RawEvent, message: Node, instance: str, names: Mapping[str, str]
) -> InboundMessage:
    message_id = message.get("id").text()
    sender = message.get("from").text()
    sent_at = _time(message.get("timestamp"))
    kind = message.get("type").text()
    content = _CONTENT.get(kind, _other)(message, kind)
    return InboundMessage(
        instance=instance, message_id=message_id, sender=sender, kind=content.kind,
        text=content.text, sent_at=sent_at, received_at=event.received_at,
        format=event.format, sender_name=names.get(sender), media_id=content.media_id,
        reply_to=content.reply_to or _reply_to(message.get("context")),
        origin=event.origin,
    )


def _time(node: Node) -> dt.datetime:
    if not (isinstance(node.value, str) and DIGITS.fullmatch(node.value)):
        raise node.bad("a string of digits")
    return from_digits(node.value, node)


def _reply_to(context: Node) -> str | None:
    if not context.present:
        return None
    return context.get("id").opt_string() or None


# --- content by message type --------------------------------------------------------------


def _text(message: Node, kind: str) -> Content:
    return Content(kind, message.get("text").get("body").string())


def _media(message: Node, kind: str) -> Content:
    """image/audio/video/document/sticker: the caption (a document's filename if none)."""
    media = message.get(kind)
    text = media.get("caption").opt_string()
    if not text and kind == "document":
        text = media.get("filename").opt_string()
    return Content(kind, text or "", media_id=media.get("id").text())


def _interactive(message: Node, kind: str) -> Content:
    interactive = message.get("interactive")
    reply_type = interactive.get("type").text()
    if reply_type in ("button_reply", "list_reply"):
        return Content(kind, interactive.get(reply_type).get("title").string())
    return Content(kind, "")


def _button(message: Node, kind: str) -> Content:
    return Content(kind, message.get("button").get("text").string())


def _reaction(message: Node, kind: str) -> Content:
    """An empty or missing emoji means the reaction was removed: text ``""``."""
    reaction = message.get("reaction")
    emoji = reaction.get("emoji").opt_string() or ""
    return Content(kind, emoji, reply_to=reaction.get("message_id").opt_string() or None)


def _location(message: Node, kind: str) -> Content:
    return Content(kind, place(message.get("location"), "latitude", "longitude"))


def _contacts(message: Node, kind: str) -> Content:
    names = []
    for contact in message.get("contacts").items():
        name = contact.get("name")
        formatted = name.get("formatted_name").opt_string() if name.present else None
        if formatted:
            names.append(formatted)
    return Content(kind, ", ".join(names))


def _other(_message: Node, kind: str) -> Content:
    """Unsupported and future types still reach the pipeline, as their own kind."""
    return Content(kind, "")


_CONTENT: dict[str, Callable[[Node, str], Content]] = {
    "text": _text,
    "image": _media,
    "audio": _media,
    "video": _media,
    "document": _media,
    "sticker": _media,
    "interactive": _interactive,
    "button": _button,
    "reaction": _reaction,
    "location": _location,
    "contacts": _contacts,
}
