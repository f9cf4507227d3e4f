"""Intake's I/O: the batch stage that stores parsed events in the inbox (logs, replays) and
the webhook's intake, which stores one body before the request is acknowledged. What they
decide -- which parts are messages, receipts or finished here, and their outcome lines -- is
:mod:`stages.intake`."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs
import trio
from loguru import logger

from pipeline.concurrency import Backoff, with_retry
from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.grouped import Grouped, each_or_alone
from pipeline.store import PhoneRule, Store
from stages.intake import Accepted, finished, redact_body, redelivered, sort_parts
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
    #: what an own-number message the pipeline did not send does: "off" in replays (their
    #: recorded echoes are of the original run's sends)
    phone: PhoneRule = "off"

    async def __call__(self, batch: Sequence[RawEvent | Invalid]) -> list[Outcome]:
        groups: list[tuple[RawEvent, list[InboundMessage]]] = []
        receipts: list[Receipt] = []
        for event in batch:
            parts = sort_parts([event] if isinstance(event, Invalid)
                               else parse_event(event, self.directory))
            receipts += parts.receipts
            for item in parts.ended:
                await self._finish(item, event)
            if parts.messages:
                assert isinstance(event, RawEvent)
                groups.append((event, list(parts.messages)))
        if receipts and self.receipts:
            await with_retry(lambda: self.store.record_receipts(receipts, self.phone),
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


class InboxWrites(Protocol):
    """The two writes a webhook's acknowledgement waits for."""

    async def store_inbound(self, messages: Sequence[InboundMessage],
                            first_due: dt.timedelta = ..., *, stamp: bool = ...
                            ) -> list[Stored]: ...

    async def record_receipts(self, receipts: Sequence[Receipt], phone: PhoneRule = ...
                              ) -> int: ...


@attrs.frozen
class _Body:
    messages: Sequence[InboundMessage]
    receipts: Sequence[Receipt]


@attrs.define(eq=False)
class SharedWrites:
    """Live intake's writes, shared by the requests in flight (group commit,
    :class:`pipeline.grouped.Grouped`): the bodies that arrive while a write is under way
    leave together in the next one -- one statement for all their messages, one for all
    their receipts, one commit -- and each request is answered once its own rows are
    committed. A batch the database refuses for its data is written body by body, so only
    the body at fault gets the error; an unavailable database fails every body of the batch
    (each request answers 503)."""

    store: InboxWrites
    first_due: dt.timedelta = dt.timedelta(0)
    phone: PhoneRule = "record"
    writers: int = 2
    on_batch: Callable[[int], None] = lambda size: None
    grouped: Grouped[_Body, list[Stored]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.grouped = Grouped(self._flush, writers=self.writers, on_batch=self.on_batch)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.grouped.run(task_status=task_status)

    def close(self) -> None:
        self.grouped.close()

    async def write(self, messages: Sequence[InboundMessage], receipts: Sequence[Receipt]
                    ) -> list[Stored]:
        """Store one body's messages and receipts; return its messages as stored."""
        return await self.grouped(_Body(messages, receipts))

    async def _flush(self, bodies: list[_Body]) -> list[list[Stored] | Exception]:
        results = await each_or_alone(bodies, self._messages)
        kept = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
        receipts = await each_or_alone([bodies[i] for i in kept], self._receipts)
        for i, written in zip(kept, receipts, strict=True):
            if isinstance(written, Exception):
                results[i] = written
        return results

    async def _messages(self, bodies: Sequence[_Body]) -> list[list[Stored]]:
        messages = [m for body in bodies for m in body.messages]
        stored = (await self.store.store_inbound(messages, self.first_due, stamp=True)
                  if messages else [])
        at, each = 0, []
        for body in bodies:
            each.append(stored[at:at + len(body.messages)])
            at += len(body.messages)
        return each

    async def _receipts(self, bodies: Sequence[_Body]) -> list[bool]:
        receipts = [r for body in bodies for r in body.receipts]
        if receipts:  # recorded before the answer: a 200 means the outbox knows
            await self.store.record_receipts(receipts, self.phone)
        return [True] * len(bodies)


@attrs.define
class LiveIntake:
    """Intake for the webhook server: parse one body and store its messages *before* the
    request is acknowledged, through ``writes`` (shared with the requests in flight). Store
    errors propagate (the server answers 503)."""

    store: Store
    directory: InstanceDirectory
    writes: SharedWrites

    async def accept(self, event: RawEvent) -> Accepted:
        parts = sort_parts(parse_event(event, self.directory))
        invalid = tuple(p for p in parts.ended if isinstance(p, Invalid))
        stored = (await self.writes.write(parts.messages, parts.receipts)
                  if parts.messages or parts.receipts else [])
        for item in invalid:
            await self.store.dead_letter("intake", item, json.dumps(redact_body(event.body)))
        return Accepted(tuple(stored), tuple(finished(p, event.received_at) for p in parts.ended),
                        invalid)
