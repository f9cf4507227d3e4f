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

While the database is unavailable, recording keeps trying (``[database]
unavailable_retry_s``, the lane
stays busy meanwhile) -- but no shielded statement outlives the shutdown: once ``stopping``
is set, what is still being recorded gets ``pipeline.shutdown_grace_s`` more; once the task
is cancelled (the grace of the whole process ran out, or a second signal), one statement's
time (``query_timeout_s``, at most the grace). A send whose outcome could not be recorded is
an ERROR naming its idempotency key and is counted (``DeliveryStats.unrecorded``): the row
stays pending and is sent again when its lease ends. (A statement that is cut off mid-way
may take up to ``db.CANCEL_CLEANUP_S`` more to be cancelled on a server that hangs.)
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import attrs
import httpx
import trio
from loguru import logger

from pipeline.concurrency import Backoff, with_retry
from pipeline.config import Config, DispatchConfig, InstanceConfig
from pipeline.db import DatabaseError
from pipeline.outbox import OutboxRow, OutboxStore
from pipeline.pacing import Pacer
from pipeline.rules import database_retry
from pipeline.transports import Sender, SendResult

if TYPE_CHECKING:
    from loguru import Logger

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
    #: sends in doubt (process died, answer lost) the channel's echo showed landed: not
    #: sent again; those still waiting for an echo; those sent again after none came
    reconciled: int = 0
    awaiting_echo: int = 0
    resent_in_doubt: int = 0
    db_errors: int = 0  # claims or releases that failed; the rows stay pending
    unrecorded: int = 0  # sends that happened but whose outcome could not be recorded
    in_flight: int = 0
    peak_in_flight: int = 0

    def started(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)



@attrs.frozen
class Step:
    """What to do with a row after a send."""

    action: Literal["delivered", "retry", "dead"]
    reason: str = ""
    delay_s: float = 0.0
    provider_id: str | None = None  # the channel's id of the message sent
    in_doubt: bool = False  # a retry whose request may have landed


def backoff_policy(dispatch: DispatchConfig) -> Backoff:
    """Exponential backoff with full jitter from ``[dispatch]``."""
    return Backoff(attempts=dispatch.max_attempts, initial_s=dispatch.backoff_initial_s,
                   max_s=dispatch.backoff_max_s)


def next_step(result: SendResult, attempts_before: int, policy: Backoff,
              rng: random.Random) -> Step:
    """Decide a row's fate from its send. ``attempts_before`` counts its earlier sends, so
    the budget (``policy.attempts``) holds across restarts."""
    if result.verdict == "delivered":
        return Step("delivered", provider_id=result.provider_id)
    attempt = attempts_before + 1
    if result.verdict == "final":
        return Step("dead", f"refused at attempt {attempt}: {result.detail}")
    if attempt >= policy.attempts:
        return Step("dead", f"gave up after {attempt} attempts: {result.detail}")
    pause = (result.retry_after_s if result.retry_after_s is not None
             else policy.pause(attempt, rng))
    return Step("retry", result.detail, pause, in_doubt=result.in_doubt)


@attrs.define
class _Delivery:
    outbox: OutboxStore
    sender: Sender
    dispatch: DispatchConfig
    wake: Notifier
    stats: DeliveryStats
    rng: random.Random
    grace_s: float = math.inf  # what shielded statements get once `stopping` is set
    #: how long a finished send keeps trying to record its result during a database outage
    record_retry: Backoff | None = None
    policy: Backoff = attrs.field(init=False)
    lanes: set[int] = attrs.field(factory=set, init=False)  # conversations being sent
    retries_due: list[float] = attrs.field(factory=list, init=False)  # heap of trio times
    shielded_budget: float = attrs.field(default=math.inf, init=False)
    shields: set[trio.CancelScope] = attrs.field(factory=set, init=False)
    pacer: Pacer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.policy = backoff_policy(self.dispatch)
        self.pacer = Pacer(self.dispatch.per_number_per_s, self.dispatch.per_recipient_gap_s)

    @property
    def lease_s(self) -> float:
        return self.dispatch.timeout_s + self.outbox.query_timeout_s + LEASE_MARGIN_S

    @property
    def last_statement_s(self) -> float:
        """What shielded work gets once the task is cancelled: one statement, at most."""
        return min(self.grace_s, self.outbox.query_timeout_s)

    async def loop(self, stopping: trio.Event, sends: trio.Nursery, drain: bool = False) -> None:
        """Claim and send until ``stopping``; with ``drain`` (a finite run whose turns are
        done) go on until nothing due is left, so that its replies are all sent."""
        while not stopping.is_set() or drain:
            self.wake.clear()
            claimed = await self._claim(sends)
            if stopping.is_set() and not claimed and not self.lanes:
                return
            await self.wake.wait(self._until_next_look())

    async def watch_shutdown(self, stopping: trio.Event) -> None:
        """Bound the shielded statements once shutdown begins: ``grace_s`` from the moment
        ``stopping`` is set, :attr:`last_statement_s` from the moment this task is cancelled
        (which is what happens to every task of the delivery when it is cancelled) -- also
        during the grace. Runs until cancelled."""
        try:
            await stopping.wait()
            self.wake.notify()
            self._limit_shielded(self.grace_s)
            await trio.sleep_forever()
        except trio.Cancelled:
            self._limit_shielded(self.last_statement_s)
            raise

    def _limit_shielded(self, budget_s: float) -> None:
        self.shielded_budget = min(self.shielded_budget, budget_s)
        deadline = trio.current_time() + budget_s
        for scope in self.shields:
            scope.deadline = min(scope.deadline, deadline)

    @contextmanager
    def _shielded(self, budget_s: float = math.inf) -> Iterator[trio.CancelScope]:
        """A shielded scope that still ends by the shutdown's bound (see
        :meth:`watch_shutdown`), and after ``budget_s`` in any case."""
        limit = min(budget_s, self.shielded_budget)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + limit) as scope:
            self.shields.add(scope)
            try:
                yield scope
            finally:
                self.shields.discard(scope)

    def _until_next_look(self) -> float:
        now = trio.current_time()
        while self.retries_due and self.retries_due[0] <= now:
            heapq.heappop(self.retries_due)
        soonest = self.retries_due[0] - now if self.retries_due else math.inf
        return min(self.dispatch.poll_interval_s, soonest)

    async def _claim(self, sends: trio.Nursery) -> int:
        free = self.dispatch.concurrency - len(self.lanes)
        if free < 1:
            return 0
        try:
            rows = await self.outbox.claim(free, busy=self.lanes, lease_s=self.lease_s)
        except DatabaseError as exc:
            self.stats.db_errors += 1
            logger.bind(stage="delivery").error("cannot claim outbox rows: {}", exc)
            return 0
        for row in rows:
            self.lanes.add(row.lane)
            self.stats.started()
            sends.start_soon(self._deliver, row, name=f"deliver {row.idempotency_key}")
        return len(rows)

    async def _deliver(self, row: OutboxRow) -> None:
        try:
            if row.in_doubt_s is not None and row.to_user:
                with self._shielded(self.last_statement_s):
                    if await self._reconcile(row):
                        return
            try:
                await self._pace(row)
                result = await self.sender.send(row)
            except trio.Cancelled:
                with self._shielded(self.last_statement_s):
                    await self._release(row)
                raise
            step = next_step(result, row.attempts, self.policy, self.rng)
            with self._shielded() as scope:
                await self._record(row, step)
            if scope.cancelled_caught:
                self._unrecorded(row, step, "shutdown cut the retries short")
        finally:
            self.lanes.discard(row.lane)
            self.stats.in_flight -= 1
            self.wake.notify()

    async def _pace(self, row: OutboxRow) -> None:
        """Wait for the number's throughput and the user's gap (messages to users only)."""
        instance = self.sender.instances.get(row.instance)
        if not row.to_user or instance is None:
            return
        if instance.channel(self.dispatch).transport == "dry":
            return
        at = self.pacer.reserve(row.instance, row.target, trio.current_time())
        await trio.sleep_until(at)

    async def _reconcile(self, row: OutboxRow) -> bool:
        """A send of ``row`` may have landed (its process died mid-send, its answer was
        lost) and WhatsApp has no idempotency key: before sending again, look at what the
        channel echoed meanwhile (a status webhook carrying our key, Evolution's ``fromMe``
        echo; recorded on the row by intake). Echoed: delivered, not sent again. Nothing
        yet: wait up to ``dispatch.reconcile_s`` from that send. Still nothing: send again.
        True when the row is settled (or left to its lease) without a send now."""
        log = _log(row)
        assert row.in_doubt_s is not None
        try:
            if row.provider_id or row.receipt:
                if await self.outbox.mark_delivered(row.id, row.provider_id, sent=False):
                    self.stats.reconciled += 1
                    self.stats.delivered += 1
                    log.info("{}: the channel echoed the send in doubt ({}): delivered, not "
                             "sent again", row.idempotency_key, row.receipt or "its id")
                return True
            wait = self.dispatch.reconcile_s - row.in_doubt_s
            if wait > 0:
                if await self.outbox.await_echo(row.id, wait):
                    self.stats.awaiting_echo += 1
                    heapq.heappush(self.retries_due, trio.current_time() + wait)
                    log.info("{}: a send is in doubt; waiting {:.1f} s for the channel's "
                             "echo before sending again", row.idempotency_key, wait)
                return True
            if not await self.outbox.resend(row.id):
                return True
        except DatabaseError as exc:  # the lease ends on its own; the doubt stays recorded
            self.stats.db_errors += 1
            log.error("cannot reconcile the send in doubt of {}: {}", row.idempotency_key, exc)
            return True
        self.stats.resent_in_doubt += 1
        log.warning("{}: no echo of the send in doubt within {} s: sending it again",
                    row.idempotency_key, self.dispatch.reconcile_s)
        return False

    async def _release(self, row: OutboxRow) -> None:
        try:
            await self.outbox.release(row.id)
        except DatabaseError as exc:  # the lease ends on its own; nothing is lost
            self.stats.db_errors += 1
            _log(row).error("cannot release cancelled send of {}: {}", row.idempotency_key, exc)

    async def _record(self, row: OutboxRow, step: Step) -> None:
        """Record what the send did; while the database is unavailable keep trying (the
        lane stays busy here meanwhile), because a send that is not recorded is sent again
        once the row's lease ends, and the user would get the same reply twice."""
        try:
            await with_retry(lambda: self._apply(row, step), self.record_retry, "delivery")
        except DatabaseError as exc:  # sent again when the lease ends
            self._unrecorded(row, step, str(exc))

    def _unrecorded(self, row: OutboxRow, step: Step, why: str) -> None:
        self.stats.unrecorded += 1
        _log(row).error("{} was sent ({}) but not recorded: {}; the row stays pending and is "
                        "sent again when its lease ends", row.idempotency_key, step.action, why)

    async def _apply(self, row: OutboxRow, step: Step) -> None:
        log = _log(row)
        if step.action == "delivered":
            if await self.outbox.mark_delivered(row.id, step.provider_id):
                self.stats.delivered += 1
                log.debug("{} delivered", row.idempotency_key)
                return
        elif step.action == "retry":
            if await self.outbox.reschedule(row.id, step.delay_s, step.reason,
                                            in_doubt=step.in_doubt and row.to_user):
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
                       rng: random.Random | None = None, drain: bool = False,
                       task_status: trio.TaskStatus[DeliveryStats] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
    """Deliver outbox rows until ``stopping`` is set, then finish the sends in flight (each
    bounded by ``dispatch.timeout_s``) and return. Recording what a send did gets at most
    ``cfg.pipeline.shutdown_grace_s`` after ``stopping`` and one statement after a cancel
    (see the module docstring). ``task_status.started`` gets the stats object it keeps
    counting in (``stats`` when given)."""
    dispatch = cfg.dispatch
    stats = stats if stats is not None else DeliveryStats()
    limits = httpx.Limits(max_connections=dispatch.concurrency,
                          max_keepalive_connections=dispatch.concurrency)
    async with trio.open_nursery() as watchers:
        async with httpx.AsyncClient(timeout=dispatch.timeout_s, limits=limits,
                                     trust_env=False) as client:
            sender = Sender(dispatch, instances_by_name(cfg), client)
            delivery = _Delivery(outbox, sender, dispatch, wake, stats, rng or random.Random(),
                                 cfg.pipeline.shutdown_grace_s, database_retry(cfg.database))
            watchers.start_soon(delivery.watch_shutdown, stopping)
            async with trio.open_nursery() as sends:
                task_status.started(stats)
                await delivery.loop(stopping, sends, drain)
        watchers.cancel_scope.cancel()
