"""What the pages show, computed without I/O: the 24-hour window, waiting times, and what
an action's result means to the agent who asked for it."""

from __future__ import annotations

import datetime as dt
from typing import Literal

import attrs

from pipeline.config import Transport

#: WhatsApp's customer-service window (Cloud API): free-form messages only this long after
#: the user's last message (pipeline/transports.py sends the template after it)
WINDOW = dt.timedelta(hours=24)


@attrs.frozen
class Window:
    """Whether a free-form reply can reach the user now."""

    state: Literal["open", "closed", "none"]
    text: str
    template: str = ""  # closed: what goes out instead ("" = nothing can)

    @property
    def can_reply(self) -> bool:
        return self.state != "closed" or bool(self.template)


def window(transport: Transport, last_message_at: dt.datetime | None, now: dt.datetime,
           template: str) -> Window:
    if transport != "cloud-api":
        what = "replies are recorded, not sent" if transport == "dry" else "WhatsApp Web"
        return Window("none", f"no 24-hour window ({transport}: {what})")
    if last_message_at is None:
        return Window("closed", "the user has not written yet", template)
    left = last_message_at + WINDOW - now
    if left > dt.timedelta(0):
        return Window("open", f"open for {duration(left)}")
    closed = f"closed {duration(-left)} ago"
    if template:
        return Window("closed", f"{closed}: a reply goes out as the template "
                      f"{template!r}", template)
    return Window("closed", f"{closed}, and this number has no template: WhatsApp would "
                  "refuse a reply (set [[instances]] template)")


def duration(span: dt.timedelta) -> str:
    """A short human duration: ``45 s``, ``12 min``, ``3 h 5 min``, ``2 d 4 h``."""
    s = max(0, int(span.total_seconds()))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


#: what the agent is told after an action, by (action, result); shown on the page
NOTICES: dict[str, str] = {
    "claim:done": "You have this conversation now.",
    "claim:already": "You already have this conversation.",
    "claim:taken": "Another agent has this conversation: take it over if you must.",
    "claim:not escalated": "This conversation is with the assistant: nothing to claim.",
    "reply:done": "Reply queued: it is sent through the outbox (status below).",
    "reply:already": "That reply was sent already (the form was submitted twice).",
    "reply:taken": "Another agent has this conversation: claim it before replying.",
    "reply:not escalated": "This conversation is with the assistant again: your reply was "
                           "not sent.",
    "reply:empty": "Write something to send.",
    "reply:too long": "A WhatsApp message has at most 4096 characters.",
    "reply:window": "The 24-hour window is closed and this number has no template.",
    "note:done": "Note added (only agents see it).",
    "note:missing": "No such conversation.",
    "note:empty": "Write something to note.",
    "note:too long": "A note has at most 4096 characters.",
    "resolve:done": "Handed back to the assistant: it answers the next message.",
    "resolve:taken": "Another agent has this conversation: only they can hand it back.",
    "resolve:not escalated": "This conversation is with the assistant already.",
    "resolve:already": "This conversation is with the assistant already.",
}

MAX_TEXT = 4096
