"""Duplicate suppression rules (pure).

A redelivered message id is found by the inbox write itself (one row per (instance, message
id): the unique constraint is the source of truth, across processes and restarts) and is
reported ``duplicate`` by intake; it never becomes work twice. Within one batch of events
the rule is :func:`batch_ids`: the first delivery of an id is written, the others only count
as redeliveries. This module holds the text
rule that the claim applies to a conversation's rows (:func:`stages.turns.plan_head`): the
same text from the same sender within a window is a duplicate of the message that first
said it -- never of itself, since the rule compares rows, not deliveries -- and reactions,
which need no answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs

from stages.records import InboundMessage, Stored

MessageKey = tuple[str, str]  # (instance, message id)

#: kinds of user message that ask for no answer: stored, then ``ignored`` (an assistant that
#: answered a reaction with "sorry, I did not understand" would also count it as a failure)
NOTHING_TO_ANSWER = frozenset({"reaction"})


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@attrs.define
class TextMemory:
    """The texts one sender sent, each at the time it was last said as news."""

    window: dt.timedelta
    _last: dict[str, dt.datetime] = attrs.field(factory=dict, init=False)

    def remember(self, at: dt.datetime, text: str) -> None:
        key = normalise(text)
        if key:
            self._last[key] = at

    def is_repeat(self, at: dt.datetime, text: str) -> bool:
        """True when the same non-empty text was said within the window before ``at``."""
        if self.window <= dt.timedelta(0):
            return False
        seen = self._last.get(normalise(text))
        return seen is not None and at - seen <= self.window


@attrs.frozen
class BatchIds:
    """A batch of messages by id: ``first`` delivery of each (its index), what is written
    (``fresh``, in arrival order) and how often each id came again within the batch."""

    first: dict[MessageKey, int]
    repeats: dict[MessageKey, int]

    def fresh(self, messages: Sequence[InboundMessage]) -> list[InboundMessage]:
        return [messages[i] for i in self.first.values()]


def batch_ids(messages: Sequence[InboundMessage]) -> BatchIds:
    first: dict[MessageKey, int] = {}
    repeats: dict[MessageKey, int] = {}
    for i, msg in enumerate(messages):
        key = (msg.instance, msg.message_id)
        if key in first:
            repeats[key] = repeats.get(key, 0) + 1
        else:
            first[key] = i
    return BatchIds(first, repeats)


def stored(messages: Sequence[InboundMessage], ids: BatchIds,
           inserted: set[MessageKey]) -> list[Stored]:
    """Each message of the batch as written: new only for the first delivery of an id the
    inbox did not hold yet (``inserted``: the ids the write added)."""
    return [Stored(m, redelivered=not (ids.first[(m.instance, m.message_id)] == i
                                       and (m.instance, m.message_id) in inserted))
            for i, m in enumerate(messages)]
