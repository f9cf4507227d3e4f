"""Intake: parse raw events and store the messages in the inbox, in arrival order (the
stage and the webhook's intake are :mod:`pipeline.intake`; here what they decide).

Runs as a batch stage: every event already waiting is parsed, and all their messages are
written in one statement. That is all intake does with a message: the inbox row is the work,
which a claim takes from the database (:mod:`pipeline.claims`). Invalid events become dead
letters, receipts and own sends are ignored, a redelivered message id is a duplicate; all
three are finished here and reported straight to the outcomes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import attrs

from stages.records import (
    Ignored,
    InboundMessage,
    Invalid,
    Outcome,
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


@attrs.frozen
class Sorted:
    """What one event's parts are: messages for the inbox, receipts for the outbox, and
    the parts that end here (ignored or invalid)."""

    messages: tuple[InboundMessage, ...]
    receipts: tuple[Receipt, ...]
    ended: tuple[Ignored | Invalid, ...]


def sort_parts(parsed: Sequence[InboundMessage | Ignored | Invalid]) -> Sorted:
    return Sorted(tuple(p for p in parsed if isinstance(p, InboundMessage)),
                  tuple(p.receipt for p in parsed if isinstance(p, Ignored) and p.receipt),
                  tuple(p for p in parsed if not isinstance(p, InboundMessage)))
