"""The workload: Cloud API bodies with bursts, redeliveries and escalation requests, made
from a seed, so every mode and repetition gets the same messages."""

from __future__ import annotations

import datetime as dt
import heapq
import random
from collections.abc import Iterable, Iterator

import attrs

from pipeline.bench.settings import INSTANCE, PHONE_ID, Settings, Workload
from stages.records import InboundMessage, RawEvent

EPOCH = dt.datetime(2025, 9, 1, 9, 0, tzinfo=dt.UTC)
#: (share of messages, text): the rules answer the first three, the last is a fallback
TEXTS = [
    (0.35, "what is the price of item {c}-{k}?"),
    (0.20, "what are your opening hours on day {k}? ({c})"),
    (0.17, "do you deliver to street {c}, number {k}?"),
    (1.00, "hmm, something about my order {c}-{k}"),
]
ESCALATION_TEXT = "I want to talk to a human about order {c}-{k}"


@attrs.frozen
class BenchEvent:
    """One webhook body of the workload, and the message intake will parse from it (built
    directly, so the harness does not spend the pipeline's CPU parsing it a second time)."""

    event: RawEvent
    message: InboundMessage
    redelivery: bool
    escalates: bool


@attrs.frozen
class _Draws:
    """The random choices of one message, drawn in a fixed order from its own seed, so the
    workload does not depend on the order in which messages are generated."""

    gap_us: int
    text: str
    escalates: bool
    redelivered_after_us: int | None


def _draws(w: Workload, c: int, k: int) -> _Draws:
    rng = random.Random(f"{w.seed}/{c}/{k}")
    burst = rng.random() < w.burst_share
    gap_ms = rng.uniform(100, 500) if burst else rng.uniform(2000, 8000)
    roll, again, after_ms = rng.random(), rng.random(), rng.uniform(1000, 20000)
    escalates = roll < w.escalation_share
    text = ESCALATION_TEXT
    if not escalates:
        roll = (roll - w.escalation_share) / (1 - w.escalation_share)
        text = next(t for share, t in _cumulative(TEXTS) if roll < share)
    return _Draws(int(gap_ms * 1000), text.format(c=c, k=k), escalates,
                  int(after_ms * 1000) if again < w.redelivery_share else None)


def _cumulative(texts: list[tuple[float, str]]) -> Iterator[tuple[float, str]]:
    total = 0.0
    for share, text in texts:
        total += share
        yield min(total, 1.0), text


def generate(w: Workload) -> Iterator[BenchEvent]:
    """The workload in ``received_at`` order, made lazily: a soak run never holds it whole."""
    heap = [(int(random.Random(f"{w.seed}/{c}/start").uniform(0, w.spread_s) * 1e6), c, 0,
             False) for c in range(w.conversations)]
    heapq.heapify(heap)
    while heap:
        at_us, c, k, redelivery = heapq.heappop(heap)
        draws = _draws(w, c, k)
        if not redelivery:
            if k + 1 < w.messages:
                heapq.heappush(heap, (at_us + draws.gap_us, c, k + 1, False))
            if draws.redelivered_after_us is not None:
                heapq.heappush(heap, (at_us + draws.redelivered_after_us, c, k, True))
        yield _event(c, k, at_us, redelivery, draws)


def _event(c: int, k: int, at_us: int, redelivery: bool, draws: _Draws) -> BenchEvent:
    sender, message_id = f"55110{c:07d}", f"wamid.bench.{c}.{k}"
    received = EPOCH + dt.timedelta(microseconds=at_us)
    origin = f"bench:{c}.{k}" + ("r" if redelivery else "")
    message = {"from": sender, "id": message_id, "timestamp": str(int(received.timestamp())),
               "type": "text", "text": {"body": draws.text}}
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550001111", "phone_number_id": PHONE_ID},
             "contacts": [{"profile": {"name": f"Customer {c}"}, "wa_id": sender}],
             "messages": [message]}
    body = {"object": "whatsapp_business_account",
            "entry": [{"id": "bench", "changes": [{"field": "messages", "value": value}]}]}
    event = RawEvent(received, "cloud-api", body, origin=origin)
    inbound = InboundMessage(INSTANCE, message_id, sender, "text", draws.text,
                             received.replace(microsecond=0), received, "cloud-api",
                             sender_name=f"Customer {c}", origin=origin)
    return BenchEvent(event, inbound, redelivery, draws.escalates)


def open_at_once(events: Iterable[BenchEvent]) -> int:
    """The most conversations open at one instant of the workload (between their first and
    last message by ``received_at``): how many it sustains concurrently, in its own time."""
    spans: dict[str, list[dt.datetime]] = {}
    for item in events:
        at = item.event.received_at
        spans.setdefault(item.message.sender, [at, at])[1] = at
    edges = sorted([(first, 1) for first, _ in spans.values()]
                   + [(last, -1) for _, last in spans.values()], key=lambda e: (e[0], -e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def workload_events(settings: Settings) -> tuple[Iterable[BenchEvent], int]:
    """The pipeline's events: made once and reused, or (soak) regenerated on each pass so
    the harness's own memory stays flat."""
    w = settings.run_workload
    if settings.soak:
        total = sum(1 for _ in generate(w))
        return _Regenerating(w), total
    events = list(generate(w))
    return events, len(events)


@attrs.frozen
class _Regenerating:
    workload: Workload

    def __iter__(self) -> Iterator[BenchEvent]:
        return generate(self.workload)
