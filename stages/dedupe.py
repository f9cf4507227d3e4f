"""Duplicate suppression: redelivered message ids, and the same text repeated within a window
(and reactions, which need no answer, leave here too).

Redeliveries are found by the inbox write (one row per (instance, message id)); this module
holds the pure text rule. Memory is bounded by the window: entries older than it are dropped
as time (the messages' ``received_at``) moves on.
"""

from __future__ import annotations

import datetime as dt
from collections import deque

import attrs
import trio

from pipeline.concurrency import Backoff, with_retry
from pipeline.records import InboundMessage, Outcome, Stored
from pipeline.store import Store

#: kinds of user message that ask for no answer: stored, then ``ignored`` (an assistant that
#: answered a reaction with "sorry, I did not understand" would also count it as a failure)
NOTHING_TO_ANSWER = frozenset({"reaction"})


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


@attrs.define
class TextDeduper:
    window: dt.timedelta
    _last: dict[tuple[str, str, str], dt.datetime] = attrs.field(factory=dict, init=False)
    _order: deque[tuple[dt.datetime, tuple[str, str, str]]] = attrs.field(
        factory=deque, init=False)

    def __len__(self) -> int:
        return len(self._last)

    def is_repeat(self, msg: InboundMessage) -> bool:
        """True when the sender sent the same non-empty text within the window."""
        if self.window <= dt.timedelta(0) or not msg.text.strip():
            return False
        self._forget_before(msg.received_at - self.window)
        key = (msg.instance, msg.sender, normalise(msg.text))
        seen = self._last.get(key)
        repeat = seen is not None and msg.received_at - seen <= self.window
        if not repeat:
            self._last[key] = msg.received_at
            self._order.append((msg.received_at, key))
        return repeat

    def _forget_before(self, horizon: dt.datetime) -> None:
        while self._order and self._order[0][0] < horizon:
            at, key = self._order.popleft()
            if self._last.get(key) == at:
                del self._last[key]


@attrs.define
class Dedupe:
    """The stage: drop redelivered ids and repeated texts, report them as ``duplicate``."""

    texts: TextDeduper
    store: Store
    done: trio.MemorySendChannel[Outcome]
    retry: Backoff | None = None
    #: messages handed on and not finished yet, so that a redelivery of a message whose
    #: inbox row is pending but that no turn holds (its first write's answer was lost)
    #: is handed on instead of dropped -- and one that a turn holds is not handed on twice
    in_flight: set[tuple[str, str]] = attrs.field(factory=set)

    def finished(self, instance: str, message_id: str) -> None:
        self.in_flight.discard((instance, message_id))

    async def __call__(self, item: Stored) -> list[Stored]:
        msg = item.message
        key = (msg.instance, msg.message_id)
        if item.redelivered and not (item.pending and key not in self.in_flight):
            await self.done.send(_duplicate(msg, "redelivered message id"))
            return []
        if msg.kind in NOTHING_TO_ANSWER:
            reason = f"{msg.kind}: nothing to answer"
            await with_retry(lambda: self.store.mark_processed(
                [(msg.instance, msg.message_id)], "ignored", reason), self.retry, "dedupe")
            await self.done.send(Outcome("ignored", msg.message_id, msg.instance, msg.sender,
                                         reason=reason, origin=msg.origin))
            return []
        if self.texts.is_repeat(msg):
            await with_retry(lambda: self.store.mark_processed(
                [(msg.instance, msg.message_id)], "duplicate", "repeated text"), self.retry,
                "dedupe")
            await self.done.send(_duplicate(msg, "repeated text"))
            return []
        self.in_flight.add(key)
        return [item]


def _duplicate(msg: InboundMessage, reason: str) -> Outcome:
    return Outcome("duplicate", msg.message_id, msg.instance, msg.sender, reason=reason,
                   origin=msg.origin)
