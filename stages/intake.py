"""Intake: parse raw events and store the messages in the inbox, in arrival order.

Runs as a batch stage: every event already waiting is parsed, and all their messages are
written in one statement. That is all intake does with a message: the inbox row is the work,
which a claim takes from the database (:mod:`pipeline.claims`). Invalid events become dead
letters, receipts and own sends are ignored, a redelivered message id is a duplicate; all
three are finished here and reported straight to the outcomes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence

import attrs
import trio
from loguru import logger

from pipeline.concurrency import Backoff, with_retry
from pipeline.records import Ignored, InboundMessage, Invalid, Outcome, RawEvent, Stored
from pipeline.store import Store
from stages.parse import InstanceDirectory, parse_event


def finished(item: Ignored | Invalid) -> Outcome:
    """The outcome line of an event that ends at intake."""
    if isinstance(item, Ignored):
        return Outcome("ignored", item.message_id, item.instance, None, reason=item.reason,
                       origin=item.origin)
    where = f" (at {item.where})" if item.where and item.where != item.origin else ""
    return Outcome("invalid", None, None, None, reason=f"{item.reason}{where}",
                   origin=item.origin)


def redelivered(stored: Stored) -> Outcome:
    """The outcome of a message id that was in the inbox already (its first delivery is the
    one that gets answered)."""
    msg = stored.message
    return Outcome("duplicate", msg.message_id, msg.instance, msg.sender,
                   reason="redelivered message id", origin=msg.origin)


@attrs.define
class Intake:
    """The stage; its outputs are the outcomes of redelivered ids. ``stored`` is told when
    the new rows it wrote become due (it wakes the claimer then)."""

    store: Store
    directory: InstanceDirectory
    done: trio.MemorySendChannel[Outcome]
    retry: Backoff | None = None
    first_due: dt.timedelta = dt.timedelta(0)
    stored: Callable[[dt.datetime], None] = lambda due: None
    #: told the latest ``received_at`` of each batch once it is in the inbox (event time)
    seen: Callable[[dt.datetime], None] = lambda latest: None

    async def __call__(self, batch: Sequence[RawEvent | Invalid]) -> list[Outcome]:
        messages: list[InboundMessage] = []
        for event in batch:
            parsed = [event] if isinstance(event, Invalid) else parse_event(event, self.directory)
            for item in parsed:
                if isinstance(item, InboundMessage):
                    messages.append(item)
                else:
                    await self._finish(item, event)
        if not messages:
            return []
        stored = await with_retry(lambda: self.store.store_inbound(messages, self.first_due),
                                  self.retry, "intake")
        new = [s.message.received_at for s in stored if not s.redelivered]
        if new:
            self.stored(min(new) + self.first_due)
        self.seen(max(m.received_at for m in messages))
        return [redelivered(s) for s in stored if s.redelivered]

    async def _finish(self, item: Ignored | Invalid, event: RawEvent | Invalid) -> None:
        if isinstance(item, Invalid):
            logger.bind(stage="intake").warning("invalid event from {}: {} {}", item.origin,
                                                item.reason, item.where)
            raw = json.dumps(redact_body(event.body)) if isinstance(event, RawEvent) else None
            await self.store.dead_letter("intake", item, raw)
        await self.done.send(finished(item))


@attrs.frozen
class Accepted:
    """What one live webhook body turned into, once its messages are in the inbox."""

    stored: tuple[Stored, ...]
    finished: tuple[Outcome, ...]  # ignored and invalid parts
    invalid: tuple[Invalid, ...]

    @property
    def all_invalid(self) -> bool:
        return bool(self.invalid) and not self.stored and len(self.invalid) == len(self.finished)


def redact_body(body: object) -> object:
    """The body with Evolution's ``apikey`` field masked: recordings and dead letters keep
    everything else exactly as received, but never a credential."""
    if isinstance(body, dict) and "apikey" in body:
        return {**body, "apikey": "***"}
    return body


@attrs.define
class LiveIntake:
    """Intake for the webhook server: parse one body and store its messages *before* the
    request is acknowledged. Store errors propagate (the server answers 503)."""

    store: Store
    directory: InstanceDirectory
    first_due: dt.timedelta = dt.timedelta(0)

    async def accept(self, event: RawEvent) -> Accepted:
        parsed = parse_event(event, self.directory)
        messages = [p for p in parsed if isinstance(p, InboundMessage)]
        invalid = tuple(p for p in parsed if isinstance(p, Invalid))
        finished_parts = tuple(finished(p) for p in parsed if not isinstance(p, InboundMessage))
        stored = (await self.store.store_inbound(messages, self.first_due, stamp=True)
                  if messages
                  else [])
        for item in invalid:
            await self.store.dead_letter("intake", item, json.dumps(redact_body(event.body)))
        return Accepted(tuple(stored), finished_parts, invalid)
