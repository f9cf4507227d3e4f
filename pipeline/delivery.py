"""The delivery task: send the outbox rows, retry with backoff, dead-letter what never lands.

One long-lived task per process (:func:`run_delivery`). It claims due rows -- only the head
of each conversation's queue, see :mod:`pipeline.outbox` -- and sends each in a task of its
own, at most ``dispatch.concurrency`` at once and one per conversation. A slow or dead
receiver therefore holds one slot for at most ``dispatch.timeout_s``; every other
conversation goes on. It wakes when told that rows were committed (:meth:`Notifier.notify`),
when a send ends (a slot and maybe the conversation's next row are free), when a retry it
scheduled falls due, and every ``dispatch.poll_interval_s`` in any case.

What happens after a send is decided by :func:`next_step` (pure): delivered; retried after
a pause with full jitter (or the receiver's ``Retry-After``); or dead after
``dispatch.max_attempts`` sends or at once when the receiver refuses the row.

Cancellation never loses a row nor marks one delivered that was not: a row's state changes
only after its send returned. A send cancelled midway leaves the row pending and is released
(due again at once) in a shielded statement; once a send has returned, its outcome is
recorded shielded too, so a shutdown does not throw away a delivery that happened. A resend
is harmless to the receiver: it carries the same idempotency key.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import attrs
import httpx
import trio
from loguru import logger

from pipeline.concurrency import Backoff, with_retry
from pipeline.config import Config, DispatchConfig, InstanceConfig
from pipeline.db import DatabaseError
from pipeline.outbox import OutboxRow, OutboxStore
from pipeline.transports import Sender, SendResult

if TYPE_CHECKING:
    from loguru import Logger

#: how long a finished send keeps trying to record its result during a database outage
RECORD_RETRY = Backoff(attempts=60, initial_s=0.1, max_s=5.0, deadline_s=120.0)

#: lease of a claimed row beyond the send and the statement that records it
LEASE_MARGIN_S = 1.0


class Notifier:
    """A level-triggered wake-up: ``notify()`` from anywhere (e.g. after a commit that wrote
    outbox rows); the delivery task clears it *before* it looks at the outbox, so a notice
    that arrives while it is looking is never lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Return when notified (possibly before this call) or after ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            await self._event.wait()


@attrs.define
class DeliveryStats:
    """Every outcome counted, for the run summary."""

    delivered: int = 0
    retried: int = 0
    dead: int = 0
    db_errors: int = 0  # claims or records that failed; the rows stay pending
    in_flight: int = 0
    peak_in_flight: int = 0

    def started(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def summary(self) -> str:
        return (f"delivery: delivered={self.delivered}, retried={self.retried}, "
                f"dead={self.dead}, db errors={self.db_errors}, "
                f"peak in flight={self.peak_in_flight}")


@attrs.frozen
class Step:
    """What to do with a row after a send."""

    action: Literal["delivered", "retry", "dead"]
    reason: str = ""
    delay_s: float = 0.0


def backoff_policy(dispatch: DispatchConfig) -> Backoff:
    """Exponential backoff with full jitter from ``[dispatch]``."""
    return Backoff(attempts=dispatch.max_attempts, initial_s=dispatch.backoff_initial_s,
                   max_s=dispatch.backoff_max_s)


def next_step(result: SendResult, attempts_before: int, policy: Backoff,
              rng: random.Random) -> Step:
    """Decide a row's fate from its send. ``attempts_before`` counts its earlier sends, so
    the budget (``policy.attempts``) holds across restarts."""
    if result.verdict == "delivered":
        return Step("delivered")
    attempt = attempts_before + 1
    if result.verdict == "final":
        return Step("dead", f"refused at attempt {attempt}: {result.detail}")
    if attempt >= policy.attempts:
        return Step("dead", f"gave up after {attempt} attempts: {result.detail}")
    if result.retry_after_s is not None:
        return Step("retry", result.detail, result.retry_after_s)
    return Step("retry", result.detail, policy.pause(attempt, rng))


@attrs.define
class _Delivery:
    outbox: OutboxStore
    sender: Sender
    dispatch: DispatchConfig
    wake: Notifier
    stats: DeliveryStats
    rng: random.Random
    policy: Backoff = attrs.field(init=False)
    lanes: set[int] = attrs.field(factory=set, init=False)  # conversations being sent
    retries_due: list[float] = attrs.field(factory=list, init=False)  # heap of trio times

    def __attrs_post_init__(self) -> None:
        self.policy = backoff_policy(self.dispatch)

    @property
    def lease_s(self) -> float:
        return self.dispatch.timeout_s + self.outbox.query_timeout_s + LEASE_MARGIN_S

    async def loop(self, stopping: trio.Event, sends: trio.Nursery) -> None:
        while not stopping.is_set():
            self.wake.clear()
            await self._claim(sends)
            await self.wake.wait(self._until_next_look())

    def _until_next_look(self) -> float:
        now = trio.current_time()
        while self.retries_due and self.retries_due[0] <= now:
            heapq.heappop(self.retries_due)
        soonest = self.retries_due[0] - now if self.retries_due else math.inf
        return min(self.dispatch.poll_interval_s, soonest)

    async def _claim(self, sends: trio.Nursery) -> None:
        free = self.dispatch.concurrency - len(self.lanes)
        if free < 1:
            return
        try:
            rows = await self.outbox.claim(free, busy=self.lanes, lease_s=self.lease_s)
        except DatabaseError as exc:
            self.stats.db_errors += 1
            logger.bind(stage="delivery").error("cannot claim outbox rows: {}", exc)
            return
        for row in rows:
            self.lanes.add(row.lane)
            self.stats.started()
            sends.start_soon(self._deliver, row, name=f"deliver {row.idempotency_key}")

    async def _deliver(self, row: OutboxRow) -> None:
        try:
            try:
                result = await self.sender.send(row)
            except trio.Cancelled:
                with trio.CancelScope(shield=True):
                    await self._release(row)
                raise
            with trio.CancelScope(shield=True):
                await self._record(row, result)
        finally:
            self.lanes.discard(row.lane)
            self.stats.in_flight -= 1
            self.wake.notify()

    async def _release(self, row: OutboxRow) -> None:
        try:
            await self.outbox.release(row.id)
        except DatabaseError as exc:  # the lease ends on its own; nothing is lost
            self.stats.db_errors += 1
            _log(row).error("cannot release cancelled send of {}: {}", row.idempotency_key, exc)

    async def _record(self, row: OutboxRow, result: SendResult) -> None:
        """Record what the send did; while the database is unavailable keep trying (the
        lane stays busy here meanwhile), because a send that is not recorded is sent again
        once the row's lease ends, and the user would get the same reply twice."""
        step = next_step(result, row.attempts, self.policy, self.rng)
        try:
            await with_retry(lambda: self._apply(row, step), RECORD_RETRY, "delivery")
        except DatabaseError as exc:  # sent again when the lease ends
            self.stats.db_errors += 1
            _log(row).error("cannot record {} of {}: {}", step.action, row.idempotency_key, exc)

    async def _apply(self, row: OutboxRow, step: Step) -> None:
        log = _log(row)
        if step.action == "delivered":
            if await self.outbox.mark_delivered(row.id):
                self.stats.delivered += 1
                log.debug("{} delivered", row.idempotency_key)
                return
        elif step.action == "retry":
            if await self.outbox.reschedule(row.id, step.delay_s, step.reason):
                heapq.heappush(self.retries_due, trio.current_time() + step.delay_s)
                self.stats.retried += 1
                log.info("{} failed ({}), retry in {:.3f} s", row.idempotency_key, step.reason,
                         step.delay_s)
                return
        elif await self.outbox.mark_dead(row.id, step.reason):
            self.stats.dead += 1
            log.warning("{} is a dead letter: {}", row.idempotency_key, step.reason)
            return
        # another process settled it after our lease ran out; its outcome stands
        log.warning("{} was no longer pending; {} not recorded", row.idempotency_key,
                    step.action)


def _log(row: OutboxRow) -> Logger:
    return logger.bind(stage="delivery", conversation=row.lane)


def instances_by_name(cfg: Config) -> Mapping[str, InstanceConfig]:
    return {i.name: i for i in cfg.instances}


async def run_delivery(cfg: Config, outbox: OutboxStore, *, wake: Notifier,
                       stopping: trio.Event, stats: DeliveryStats | None = None,
                       rng: random.Random | None = None,
                       task_status: trio.TaskStatus[DeliveryStats] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Deliver outbox rows until ``stopping`` is set, then finish the sends in flight (each
    bounded by ``dispatch.timeout_s``) and return. ``task_status.started`` gets the stats
    object it keeps counting in (``stats`` when given)."""
    dispatch = cfg.dispatch
    stats = stats if stats is not None else DeliveryStats()
    limits = httpx.Limits(max_connections=dispatch.concurrency,
                          max_keepalive_connections=dispatch.concurrency)
    async with trio.open_nursery() as relay:
        relay.start_soon(_notify_when_set, stopping, wake)
        async with httpx.AsyncClient(timeout=dispatch.timeout_s, limits=limits,
                                     trust_env=False) as client:
            sender = Sender(dispatch, instances_by_name(cfg), client)
            delivery = _Delivery(outbox, sender, dispatch, wake, stats, rng or random.Random())
            async with trio.open_nursery() as sends:
                task_status.started(stats)
                await delivery.loop(stopping, sends)
        relay.cancel_scope.cancel()


async def _notify_when_set(event: trio.Event, wake: Notifier) -> None:
    await event.wait()
    wake.notify()
