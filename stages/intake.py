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
from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.store import Store
from stages.parse import InstanceDirectory, parse_event
from stages.records import (
    Ignored,
    InboundMessage,
    Invalid,
    Outcome,
    RawEvent,
    Receipt,
    Stored,
)


def finished(item: Ignored | Invalid, at: dt.datetime | None = None) -> Outcome:
    """The outcome line of an event that ends at intake (received at ``at``)."""
    if isinstance(item, Ignored):
        return Outcome("ignored", item.message_id, item.instance, None, reason=item.reason,
                       origin=item.origin, at=at,
                       receipt=item.receipt.status if item.receipt else None)
    where = f" (at {item.where})" if item.where and item.where != item.origin else ""
    return Outcome("invalid", None, None, None, reason=f"{item.reason}{where}",
                   origin=item.origin, at=at or item.at)


def redelivered(stored: Stored) -> Outcome:
    """The outcome of a message id that was in the inbox already (its first delivery is the
    one that gets answered)."""
    msg = stored.message
    return Outcome("duplicate", msg.message_id, msg.instance, msg.sender,
                   reason="redelivered message id", origin=msg.origin, at=msg.received_at)


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
    #: apply receipts to the outbox (off when every channel is dry: nothing was sent, and a
    #: replay's statements stay the same whatever the batching)
    receipts: bool = True
    #: an own-number message the pipeline did not send hands its conversation to humans
    phone_hold: bool = False

    async def __call__(self, batch: Sequence[RawEvent | Invalid]) -> list[Outcome]:
        groups: list[tuple[RawEvent, list[InboundMessage]]] = []
        receipts: list[Receipt] = []
        for event in batch:
            parsed = [event] if isinstance(event, Invalid) else parse_event(event, self.directory)
            receipts += [p.receipt for p in parsed if isinstance(p, Ignored) and p.receipt]
            messages = [item for item in parsed if isinstance(item, InboundMessage)]
            for item in parsed:
                if not isinstance(item, InboundMessage):
                    await self._finish(item, event)
            if messages:
                assert isinstance(event, RawEvent)
                groups.append((event, messages))
        if receipts and self.receipts:
            await with_retry(lambda: self.store.record_receipts(receipts, self.phone_hold),
                             self.retry, "intake")
        if not groups:
            return []
        try:
            stored = await self._store([m for _, group in groups for m in group])
        except DatabaseUnavailable:
            raise
        except DatabaseError as exc:
            if len(groups) == 1:
                await self._unstorable(*groups[0], exc)
                return []
            # one event spoils the statement: store them one by one, so only it is lost
            stored = []
            for event, messages in groups:
                try:
                    stored += await self._store(messages)
                except DatabaseUnavailable:
                    raise
                except DatabaseError as one:
                    await self._unstorable(event, messages, one)
        return [redelivered(s) for s in stored if s.redelivered]

    async def _store(self, messages: list[InboundMessage]) -> list[Stored]:
        stored = await with_retry(lambda: self.store.store_inbound(messages, self.first_due),
                                  self.retry, "intake")
        new = [s.message.received_at for s in stored if not s.redelivered]
        if new:
            self.stored(min(new) + self.first_due)
        self.seen(max(m.received_at for m in messages))
        return stored

    async def _unstorable(self, event: RawEvent, messages: list[InboundMessage],
                          exc: DatabaseError) -> None:
        """An event whose messages the inbox refuses: a dead letter, like an invalid one."""
        self.seen(max(m.received_at for m in messages))
        reason = f"the inbox refused its {len(messages)} message(s): {exc}"[:500]
        await self._finish(Invalid(reason, format=event.format, origin=event.origin), event)

    async def _finish(self, item: Ignored | Invalid, event: RawEvent | Invalid) -> None:
        if isinstance(item, Invalid):
            logger.bind(stage="intake").warning("invalid event from {}: {} {}", item.origin,
                                                item.reason, item.where)
            raw = json.dumps(redact_body(event.body)) if isinstance(event, RawEvent) else None
            await self.store.dead_letter("intake", item, raw)
        await self.done.send(finished(item, event.received_at
                                      if isinstance(event, RawEvent) else None))


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
    #: an own-number message the pipeline did not send hands its conversation to humans
    phone_hold: bool = False

    async def accept(self, event: RawEvent) -> Accepted:
        parsed = parse_event(event, self.directory)
        messages = [p for p in parsed if isinstance(p, InboundMessage)]
        invalid = tuple(p for p in parsed if isinstance(p, Invalid))
        finished_parts = tuple(finished(p, event.received_at) for p in parsed
                               if not isinstance(p, InboundMessage))
        stored = (await self.store.store_inbound(messages, self.first_due, stamp=True)
                  if messages
                  else [])
        receipts = [p.receipt for p in parsed if isinstance(p, Ignored) and p.receipt]
        if receipts:  # recorded before the answer: a 200 means the outbox knows
            await self.store.record_receipts(receipts, self.phone_hold)
        for item in invalid:
            await self.store.dead_letter("intake", item, json.dumps(redact_body(event.body)))
        return Accepted(tuple(stored), finished_parts, invalid)
