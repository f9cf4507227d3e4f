"""Recorded time, turns and end-to-end timing: which arrival closes each turn, and how long
each message took from then to its outcome."""

from __future__ import annotations

import datetime as dt
import heapq
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from pipeline.bench.workload import BenchEvent
from pipeline.claims import Claimer
from pipeline.db import Pool
from pipeline.engine import Inlets, Pipeline
from pipeline.metrics import Histogram
from pipeline.store import ClaimBatch, ClaimRequest, Store
from stages.outcomes import OutcomeSink
from stages.records import Claim, ClaimCommit, Committed, InboundMessage, Outcome
from stages.turns import BurstRules


class BenchStore(Store):
    """The pipeline's store, also counting claim statements and timing each claimed turn
    from its claim to its commit."""

    def __init__(self, pool: Pool, query_timeout_s: float) -> None:
        super().__init__(pool, query_timeout_s)
        self.claims = 0
        self.claimed_at: dict[int, float] = {}  # token -> when its claim returned
        self.claim_to_commit = Histogram()

    async def claim(self, req: ClaimRequest) -> ClaimBatch:
        batch = await super().claim(req)
        self.claims += 1
        now = time.perf_counter()
        for claimed in batch.claims:
            self.claimed_at[claimed.token] = now
        return batch

    async def commit_claim(self, commit: ClaimCommit) -> Committed:
        done = await super().commit_claim(commit)
        start = self.claimed_at.pop(commit.claim.token, None)
        if start is not None:
            self.claim_to_commit.record((time.perf_counter() - start) * 1000)
        return done

    async def release(self, claim: Claim, due: dt.datetime, *, error: str | None = None,
                      failed: bool = False) -> bool:
        self.claimed_at.pop(claim.token, None)
        return await super().release(claim, due, error=error, failed=failed)


@attrs.define
class TurnMirror:
    """The burst rule of :func:`stages.turns.plan_head` over the workload's fresh messages
    in arrival order: which arrival closes each turn. A turn closes when a message received
    after its deadline arrives -- of any sender: the recorded clock has passed it -- or when
    it is full; :meth:`flush` closes the rest (the clock jumps past every deadline). The
    workload has no reactions and no repeated texts, so every fresh message joins a turn."""

    rules: BurstRules
    open: dict[str, list[InboundMessage]] = attrs.Factory(dict)
    deadlines: list[tuple[dt.datetime, int, str]] = attrs.Factory(list)
    seq: int = 0

    def add(self, msg: InboundMessage) -> list[list[InboundMessage]]:
        closed = self.expire(msg.received_at)
        turn = self.open.setdefault(msg.sender, [])
        turn.append(msg)
        if len(turn) >= self.rules.limit:
            closed.append(self.open.pop(msg.sender))
        else:
            self.seq += 1
            heapq.heappush(self.deadlines, (self._deadline(turn), self.seq, msg.sender))
        return closed

    def expire(self, now: dt.datetime) -> list[list[InboundMessage]]:
        """The turns whose deadline is before ``now`` (strictly, as the claim decides)."""
        closed = []
        while self.deadlines and self.deadlines[0][0] < now:
            deadline, _, sender = heapq.heappop(self.deadlines)
            turn = self.open.get(sender)
            if turn is not None and self._deadline(turn) == deadline:
                closed.append(self.open.pop(sender))
        return closed

    def flush(self) -> list[list[InboundMessage]]:
        closed, self.open, self.deadlines = list(self.open.values()), {}, []
        return closed

    def _deadline(self, turn: list[InboundMessage]) -> dt.datetime:
        first, last = turn[0].received_at, turn[-1].received_at
        return min(last + self.rules.window, first + self.rules.wait) \
            if self.rules.limit > 1 else first


@attrs.define
class Tracker:
    """When each message entered the pipeline and when its turn could first be formed.

    A :class:`TurnMirror` (the claim's burst rule, the same config, fed the same fresh
    messages in the same order) says which event closes each turn; redeliveries never join a
    turn (intake finishes them), so they do not move it here either. Entries are dropped when
    the outcome arrives: memory follows the messages in flight.
    """

    mirror: TurnMirror
    entered_at: dict[str, float] = attrs.Factory(dict)
    ready_at: dict[str, float] = attrs.Factory(dict)
    events: int = 0
    unmatched: int = 0
    degraded: int = 0
    turns: int = 0
    source_ended_at: float = 0.0
    e2e: Histogram = attrs.Factory(Histogram)
    e2e_with_burst: Histogram = attrs.Factory(Histogram)
    service: Histogram = attrs.Factory(Histogram)

    def entered(self, item: BenchEvent, now: float) -> None:
        self.events += 1
        self.entered_at[item.event.origin] = now
        if item.redelivery:
            self.ready_at[item.event.origin] = now
        else:
            self._ready(self.mirror.add(item.message), now)

    def source_ended(self, now: float) -> None:
        self.source_ended_at = now
        self._ready(self.mirror.flush(), now)

    def _ready(self, turns: list[list[InboundMessage]], now: float) -> None:
        for turn in turns:
            self.turns += 1
            for msg in turn:
                self.ready_at[msg.origin] = now

    def finished(self, outcome: Outcome, now: float) -> None:
        ready, entered = self.ready_at.pop(outcome.origin, None), \
            self.entered_at.pop(outcome.origin, None)
        if ready is None or entered is None:
            self.unmatched += 1
            return
        self.e2e.record((now - ready) * 1000)
        self.e2e_with_burst.record((now - entered) * 1000)
        stages = [ms for stage, ms in outcome.timings_ms if stage != "buffer"]
        if stages:  # the burst wait ("buffer") is in recorded time, not the service's
            self.service.record(sum(stages))
        self.degraded += bool(outcome.degraded)


def wake_if_idle(claimer: Claimer | None) -> None:
    """Work around pipeline/claims.py: in a finite run (no polling) the claimer sleeps with
    nothing due until something wakes it, and the commit of the last turn in flight does
    not (``finished(claim, None)`` wakes only at a full ``max_active``), so the run never
    ends. Called once a turn's outcomes are out: the claimer then looks, finds nothing and
    returns."""
    if claimer is not None and not claimer.in_flight:
        claimer.wake.notify()


@attrs.define
class TimedSink(OutcomeSink):
    """The outcome sink, also stopping each message's end-to-end clock."""

    tracker: Tracker | None = None
    pipeline: Pipeline | None = None

    def record(self, outcome: Outcome, at: float | None = None) -> None:
        super().record(outcome, at)
        if self.tracker is not None:
            self.tracker.finished(outcome, time.perf_counter())
        if self.pipeline is not None:
            wake_if_idle(self.pipeline.claimer)


def make_source(events: Iterable[BenchEvent], tracker: Tracker) -> Callable[[Inlets], Any]:
    """A source that pushes the workload as fast as the pipeline accepts it."""
    async def source(inlets: Inlets) -> None:
        for item in events:
            await inlets.raw.send(item.event)
            tracker.entered(item, time.perf_counter())
        tracker.source_ended(time.perf_counter())
    return source
