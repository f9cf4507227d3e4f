"""Intake: parse raw events and store the messages in the inbox, in arrival order.

Runs as a batch stage: every event already waiting is parsed, and all their messages are
written in one statement. Invalid events become dead letters, receipts and own sends are
ignored; both are finished here and reported straight to the outcomes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

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


@attrs.define
class Intake:
    store: Store
    directory: InstanceDirectory
    done: trio.MemorySendChannel[Outcome]
    retry: Backoff | None = None

    async def __call__(self, batch: Sequence[RawEvent | Invalid]) -> list[Stored]:
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
        return await with_retry(lambda: self.store.store_inbound(messages), self.retry,
                                "intake")

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

    async def accept(self, event: RawEvent) -> Accepted:
        parsed = parse_event(event, self.directory)
        messages = [p for p in parsed if isinstance(p, InboundMessage)]
        invalid = tuple(p for p in parsed if isinstance(p, Invalid))
        finished_parts = tuple(finished(p) for p in parsed if not isinstance(p, InboundMessage))
        stored = await self.store.store_inbound(messages) if messages else []
        for item in invalid:
            await self.store.dead_letter("intake", item, json.dumps(redact_body(event.body)))
        return Accepted(tuple(stored), finished_parts, invalid)
