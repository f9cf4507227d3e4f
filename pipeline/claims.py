"""The database owns the work: claiming conversations' due turns, under leases.

Intake only writes the inbox (and counts the new rows as pending work of their
conversation, due once its burst can have closed). Every process that runs turns has one
:class:`Claimer`: it takes due conversations from the database in one statement
(``FOR UPDATE SKIP LOCKED``, so many processes share the work), each under a lease with a
fencing token, decides the head of each conversation's queue (:func:`stages.turns.plan_head`)
and hands the turn to the stages. At most one turn of a conversation is in flight anywhere,
so order per conversation holds across processes, and a conversation whose turns are slow
keeps its later messages in the inbox rather than in memory: a process holds at most
``pipeline.max_active_conversations`` turns, whatever the backlog.

A turn ends in exactly one of three ways: its commit (fenced by the token: a lease taken
over writes nothing), a failure (the conversation is released and due again after a
backoff, for whichever process is alive), or the death of its process (the lease expires
after ``pipeline.lease_s``; leases of running turns are renewed every third of that). The
claimer polls every ``pipeline.poll_interval_ms``; local intake and finished turns wake it
early, and it sleeps no longer than the next due time it knows of.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import time
from collections.abc import Callable

import attrs
import trio
from loguru import logger

from pipeline.db import DatabaseError, DatabaseUnavailable
from pipeline.metrics import Metrics
from pipeline.store import (
    ClaimConflict,
    Claimed,
    ClaimRequest,
    ContextRequest,
    Store,
)
from stages.records import Claim, ClaimCommit, Closed, Outcome, Turn, utcnow
from stages.turns import BurstRules, PendingRow, plan_head, turn_id

#: after a failed turn, its conversation is due again after this pause (doubling per failure)
RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0
#: when nothing was claimed, the claimer waits at least this long (trio seconds)
MIN_PAUSE_S = 0.0005
#: a finite run (a replay) gives a failing turn this many attempts, then leaves it pending
#: in the database (a live process retries for as long as it runs)
FINITE_ATTEMPTS = 3


def owner_name() -> str:
    """Who holds a lease: host and process, for operators reading ``conversations``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def dead_local_owners(owners: list[str], host: str) -> list[str]:
    """The owners among ``owners`` that were processes of ``host`` and no longer run: their
    leases need not be waited out (a process restarted after a crash takes its turns over at
    once). Fencing tokens keep this safe even if a pid was reused."""
    dead = []
    for owner in owners:
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            dead.append(owner)
        except PermissionError:
            continue  # alive: another user's process
    return dead


@attrs.frozen
class WorkClock:
    """The time turns are decided on: ``now()`` (wall clock live, recorded time in a
    replay), ``at(t)``, the Trio time at which ``now()`` reaches ``t``, and ``later(s)``:
    ``s`` seconds from now (a retry's due time)."""

    now: Callable[[], dt.datetime]
    at: Callable[[dt.datetime], float]
    after: Callable[[float], dt.datetime] | None = None
    #: live: claims and commits decide on the database's clock (which stamps live
    #: intake's received_at); ``now`` is then only this process's estimate of it
    database: bool = False
    #: event time (a replay): a turn's buffer time is when its burst closed by the rules,
    #: not when it happened to be claimed
    event: bool = False

    def later(self, seconds: float) -> dt.datetime:
        if self.after is not None:
            return self.after(seconds)
        return self.now() + dt.timedelta(seconds=seconds)


def wall_clock() -> WorkClock:
    def at(when: dt.datetime) -> float:
        return trio.current_time() + (when - utcnow()).total_seconds()

    return WorkClock(utcnow, at, database=True)


#: the event time of a finite run whose sources have ended: every burst has closed
END_OF_INPUT = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)


@attrs.define
class Watermark:
    """Event time for a finite run fed as fast as it can be read (tests, benchmarks):
    ``now()`` is the latest ``received_at`` whose rows are all in the inbox, so a burst
    closes when a later message has been stored or the input has ended -- never because
    the machine was slow. ``on_advance`` is told when it moves (the claimer looks again)."""

    latest: dt.datetime = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    ended: bool = False
    on_advance: Callable[[], None] = lambda: None

    def advance(self, to: dt.datetime) -> None:
        if to > self.latest:
            self.latest = to
            self.on_advance()

    def end(self) -> None:
        self.ended = True
        self.on_advance()

    def now(self) -> dt.datetime:
        return END_OF_INPUT if self.ended else self.latest

    def at(self, when: dt.datetime) -> float:
        """Event time passes ``when`` only when stored input says so: at once or never."""
        return -math.inf if when <= self.now() else math.inf

    def later(self, seconds: float) -> dt.datetime:
        """Once the input has ended no more time passes: a retry is due at once."""
        return END_OF_INPUT if self.ended else self.latest + dt.timedelta(seconds=seconds)

    def clock(self) -> WorkClock:
        return WorkClock(self.now, self.at, self.later, event=True)


class Wake:
    """What wakes the claimer: ``notify()`` asks it to look now (a slot is free, shutdown);
    ``due(t)`` tells it that work becomes due at ``t`` (new rows, a commit that left some),
    so it can sleep until then without asking the database."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.look = False
        self.hint: dt.datetime | None = None

    def notify(self) -> None:
        self.look = True
        self._event.set()

    def due(self, at: dt.datetime | None) -> None:
        if at is not None and (self.hint is None or at < self.hint):
            self.hint = at
            self._event.set()

    def poke(self) -> None:
        """Time moved (event time): recompute how long to sleep."""
        self._event.set()

    def take(self) -> dt.datetime | None:
        """Start a look: forget the requests so far (the look answers them)."""
        hint, self.hint, self.look = self.hint, None, False
        return hint

    async def wait_until(self, deadline: float) -> None:
        if self._event.is_set():
            self._event = trio.Event()
        with trio.move_on_at(deadline):
            await self._event.wait()


def retry_pause(attempts: int) -> float:
    return min(RETRY_MAX_S, RETRY_INITIAL_S * 2.0 ** min(max(0, attempts - 1), 16))


@attrs.define
class Claimer:
    """Takes due turns from the database and hands them to ``out`` (see the module
    docstring). ``finite``: set when the sources have ended and intake has written
    everything (a replay): the claimer then returns once no work is left."""

    store: Store
    rules: BurstRules
    out: trio.MemorySendChannel[Turn]
    done: trio.MemorySendChannel[Outcome]
    clock: WorkClock
    max_active: int
    lease_s: float
    poll_s: float | None
    stopping: trio.Event
    finite: trio.Event | None = None
    renew: bool = True
    #: load each claimed conversation's context with the claim ([context] mode "claimed")
    context: ContextRequest | None = None
    metrics: Metrics = attrs.field(factory=Metrics)
    owner: str = attrs.field(factory=owner_name)
    wake: Wake = attrs.field(factory=Wake)
    in_flight: dict[int, tuple[Claim, float]] = attrs.field(factory=dict)  # token → claim
    #: a finite run's conversations whose turn failed FINITE_ATTEMPTS times: left pending
    given_up: set[int] = attrs.field(factory=set)
    _idle: trio.Event = attrs.field(factory=trio.Event)

    def first_due(self) -> dt.timedelta:
        return self.rules.first_due

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.done:
            async with trio.open_nursery() as nursery:
                if self.renew:
                    nursery.start_soon(self._renew_leases)
                    await self._take_over_dead_local()
                task_status.started()
                with self.out:
                    await self._claim(nursery)
                while self.in_flight:  # their stages finish them; keep their leases alive
                    self._idle = trio.Event()
                    await self._idle.wait()
                nursery.cancel_scope.cancel()

    async def _take_over_dead_local(self) -> None:
        """Leases of crashed processes of this host are given back at once, not after
        ``lease_s`` (other hosts' dead processes: after their leases expire)."""
        host = socket.gethostname()
        try:
            dead = dead_local_owners(await self.store.lease_owners(f"{host}:"), host)
            taken = await self.store.release_owners(dead) if dead else 0
        except DatabaseError as exc:
            logger.bind(stage="claims").warning("could not look for leases of dead processes "
                                                "({}); they expire after {} s", exc, self.lease_s)
            return
        if taken:
            logger.bind(stage="claims").warning(
                "took over {} conversations of dead processes of this host ({}): their "
                "turns are redone now", taken, ", ".join(dead))

    # --- the turn stages report back --------------------------------------------------------

    def finished(self, claim: Claim, next_due: dt.datetime | None = None) -> None:
        """The claim was committed; its conversation is due again at ``next_due`` (None:
        nothing of it is pending)."""
        if (held := self.in_flight.get(claim.token)) is not None:
            self.metrics.operation("turn").record((time.monotonic() - held[1]) * 1000)
        self._forget(claim)
        self.wake.due(next_due)

    async def failed(self, claim: Claim, exc: BaseException) -> None:
        """The turn failed: give its conversation back, due again after a pause."""
        transient = isinstance(exc, DatabaseUnavailable)
        attempts = claim.attempts + 1
        pause = retry_pause(attempts)
        self.metrics.counters["failed turns"] += 1
        if isinstance(exc, ClaimConflict):
            self.metrics.counters["claims lost"] += 1
        if self.finite is not None and attempts >= FINITE_ATTEMPTS:
            self.given_up.add(claim.conversation_id)
            logger.bind(stage="claims").error(
                "conversation {}: its turn failed {} times; left pending in the database "
                "for the next run ({})", claim.conversation_id, attempts, exc)
        due = self.clock.later(pause)
        self._forget(claim)
        self.wake.due(due)
        try:
            with trio.move_on_after(self.store.query_timeout_s):
                await self.store.release(claim, due, error=str(exc)[:500],
                                         failed=not transient)
        except DatabaseError as err:
            logger.bind(stage="claims").warning(
                "could not release conversation {} ({}): its lease expires in {} s",
                claim.conversation_id, err, self.lease_s)

    def _forget(self, claim: Claim) -> None:
        self.in_flight.pop(claim.token, None)
        if len(self.in_flight) == self.max_active - 1:
            self.wake.notify()  # the claimer may be waiting for a free slot
        if not self.in_flight:
            self._idle.set()
            if self.finite is not None and self.finite.is_set():
                self.wake.notify()  # the last turn of a replay: the claimer may be done

    def held(self) -> list[tuple[int, int]]:
        return [(c.conversation_id, c.token) for c, _ in self.in_flight.values()]

    async def release_held(self) -> int:
        """Give back every lease still held (turns cancelled at shutdown): due at once."""
        held = self.held()
        if not held:
            return 0
        released = await self.store.release_all(held)
        self.in_flight.clear()
        return released

    # --- the loop ---------------------------------------------------------------------------

    async def _claim(self, nursery: trio.Nursery) -> None:
        failures = 0
        while not self.stopping.is_set():
            free = self.max_active - len(self.in_flight)
            if free <= 0:
                await self.wake.wait_until(math.inf)
                continue
            hint = self.wake.take()
            request = ClaimRequest(self.owner, None if self.clock.database else self.clock.now(),
                                   free, self.lease_s, self.rules,
                                   rows_per_claim=4 * self.rules.max_messages + 16,
                                   held=tuple(c.conversation_id
                                              for c, _ in self.in_flight.values())
                                   + tuple(self.given_up),
                                   context=self.context)
            try:
                batch = await self.store.claim(request)
            except DatabaseError as exc:
                failures += 1
                pause = retry_pause(failures)
                logger.bind(stage="claims").warning("claiming work failed ({}); again in "
                                                    "{:.1f} s", exc, pause)
                self.wake.due(hint)
                await self.wake.wait_until(trio.current_time() + pause)
                continue
            failures = 0
            now = batch.now
            self.metrics.counters["claims"] += len(batch.claims)
            self.metrics.counters["lease expiries"] += sum(c.expired for c in batch.claims)
            for claimed in batch.claims:
                await self._take(claimed, now, nursery)
            if len(batch.claims) >= free:
                continue  # there may be more due work
            if (self.finite is not None and self.finite.is_set() and not batch.claims
                    and not self.in_flight and batch.candidates == 0 and batch.next_due is None
                    and self.wake.hint is None):
                return
            await self._sleep(batch.next_due)

    async def _sleep(self, next_due: dt.datetime | None) -> None:
        """Until the next due time known (from the database or a wake-up), a poll, or a
        request to look now."""
        start = trio.current_time()
        while not (self.wake.look or self.stopping.is_set()):
            due = min((t for t in (next_due, self.wake.hint) if t is not None), default=None)
            deadline = self._next_look(due, start)
            if trio.current_time() >= deadline:
                return
            await self.wake.wait_until(deadline)

    def _next_look(self, next_due: dt.datetime | None, start: float) -> float:
        deadline = start + self.poll_s if self.poll_s is not None else math.inf
        if next_due is not None:
            deadline = min(deadline, self.clock.at(next_due))
        return max(deadline, start + MIN_PAUSE_S)

    async def _take(self, claimed: Claimed, now: dt.datetime, nursery: trio.Nursery) -> None:
        rows = [PendingRow(row_id, msg) for row_id, msg in claimed.rows]
        head = plan_head(rows, claimed.recent, self.rules, now)
        claim = Claim(claimed.conversation_id, claimed.token,
                      tuple(r.row_id for r in head.turn), head.closed, claimed.attempts)
        self.in_flight[claim.token] = (claim, time.monotonic())
        if not head.ready:
            assert head.deadline is not None
            nursery.start_soon(self._not_yet, claim, head.deadline)
            return
        if not head.turn:
            first = head.closed[0].message
            nursery.start_soon(self._close, claim, first.instance)
            return
        messages = tuple(r.message for r in head.turn)
        first = messages[0]
        turn = Turn(turn_id(messages), first.instance, first.sender, messages,
                    context=claimed.context, claim=claim)
        closed_at = max(now, messages[-1].received_at)
        if self.clock.event:  # when the rules closed it: the same in every run
            assert head.deadline is not None
            closed_at = (messages[-1].received_at if len(messages) >= self.rules.limit
                         else head.deadline)
        waited = (closed_at - first.received_at).total_seconds()
        await self.out.send(turn.timed("buffer", max(0.0, waited) * 1000))

    async def _not_yet(self, claim: Claim, deadline: dt.datetime) -> None:
        """The claim found the turn still open (rows that do not join it made the database
        think otherwise): give it back until its deadline."""
        due = deadline + dt.timedelta(milliseconds=1)
        try:
            await self.store.release(claim, due)
            self.wake.due(due)
        except DatabaseError as exc:
            logger.bind(stage="claims").warning("could not release conversation {}: {}",
                                                claim.conversation_id, exc)
        self._forget(claim)

    async def _close(self, claim: Claim, instance: str) -> None:
        """A claim without a turn (only repeated texts or reactions): close its rows."""
        commit = close_commit(claim, instance, self.rules,
                              None if self.clock.database else self.clock.now())
        try:
            result = await self.store.commit_claim(commit)
        except DatabaseError as exc:
            await self.failed(claim, exc)
            return
        self.finished(claim, result.next_due)
        for closed in claim.closed:
            await self.done.send(closed_outcome(closed))

    async def _renew_leases(self) -> None:
        every = self.lease_s / 3
        while True:
            await trio.sleep(every)
            old = time.monotonic() - every
            due = [(c.conversation_id, c.token) for c, at in list(self.in_flight.values())
                   if at <= old]
            if not due:
                continue
            try:
                kept = await self.store.renew(due, self.lease_s)
            except DatabaseError as exc:
                logger.bind(stage="claims").warning("renewing {} leases failed: {}",
                                                    len(due), exc)
                continue
            self.metrics.counters["lease renewals"] += 1
            lost = [conv for conv, token in due if token not in kept]
            if lost:
                self.metrics.counters["leases lost"] += len(lost)
                logger.bind(stage="claims").warning(
                    "lost the lease of conversations {}: their turns will not be committed "
                    "here", lost)


def closed_outcome(closed: Closed) -> Outcome:
    msg = closed.message
    return Outcome(closed.action, msg.message_id, msg.instance, msg.sender,
                   reason=closed.reason, origin=msg.origin, at=msg.received_at)


def claim_key(claim: Claim) -> str:
    """The key the rows closed without a turn carry (their commit is recognised by it)."""
    return f"k_{claim.token}"


def close_commit(claim: Claim, instance: str, rules: BurstRules,
                 now: dt.datetime | None) -> ClaimCommit:
    key = claim_key(claim)
    rows = tuple((c.row_id, c.action, c.reason, key) for c in claim.closed)
    return ClaimCommit(claim, instance, rows, None, rules.first_due, now)
