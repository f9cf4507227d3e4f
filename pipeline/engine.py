"""The stage graph, built from the config and run in one nursery:

    sources → intake → inbox (PostgreSQL) → claimer → context → escalation → respond →
    dispatch → outcomes

Intake writes the inbox and nothing else; the claimer (:mod:`pipeline.claims`) takes due
turns from the database, one per conversation at a time, so the turn stages never hold two
turns of one conversation and a slow conversation's backlog waits in the inbox. Nurseries
are nested by lifetime (STYLE rule 6): the store is opened by the caller, the delivery task
outermost, the stages inside a cancel scope that a shutdown gives a deadline.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from loguru import logger

from pipeline.claims import Claimer, Watermark, WorkClock, wall_clock
from pipeline.commits import SharedCommits
from pipeline.config import Config
from pipeline.context import ContextBatcher, ContextLoader, ContextQueries
from pipeline.db import DatabaseError
from pipeline.delivery import DeliveryStats, Notifier, run_delivery
from pipeline.instances import InstanceCache
from pipeline.intake import Intake
from pipeline.metrics import Metrics
from pipeline.outbox import OutboxStore
from pipeline.responders import build_responder
from pipeline.retention import RetentionStore, run_retention
from pipeline.retried import RetriedCommits, RetriedContexts
from pipeline.rules import (
    burst_rules,
    database_retry,
    dry_instances,
    escalation_rules,
    instance_directory,
    phone_rule,
)
from pipeline.runtime import batch_stage, keyed_path
from pipeline.store import ContextRequest, InstanceRow, Store
from stages.context import LoadContext
from stages.dispatch import Commits, Dispatch, Messages
from stages.escalation import Escalation
from stages.outcomes import OutcomeSink, collect_outcomes
from stages.records import Invalid, Outcome, RawEvent, Turn
from stages.respond import Respond, Responder


def instance_rows(cfg: Config) -> list[InstanceRow]:
    return [InstanceRow(i.name, i.phone_number_id, i.evolution_instance,
                        {"webhook_url": i.webhook_url, "responder": i.responder})
            for i in cfg.instances]


def responders(cfg: Config, client: httpx.AsyncClient | None) -> dict[str, Responder]:
    """The responder of each instance; instances naming the same responder share one.
    ``client`` is the HTTP client of the ``openai`` responders."""
    built = {name: build_responder(name, cfg.responders[name], client)
             for name in dict.fromkeys(i.responder for i in cfg.instances)}
    return {i.name: built[i.responder] for i in cfg.instances}


#: time kept back from the shutdown grace to give the leases of cancelled turns back
RELEASE_S = 1.0


@attrs.frozen
class Inlets:
    """Where a source puts what it reads; each source gets its own clones and closes them.

    ``raw`` goes through intake (parse, store); ``done`` takes outcomes the source settled
    itself (a webhook stores its messages before it answers, then reports what ended there);
    ``stored(due)`` is called when a source has written new work to the inbox that becomes
    due at ``due`` (it wakes the claimer then). ``stopping`` is set when the pipeline shuts
    down: sources finish what they hold and return.
    """

    raw: trio.MemorySendChannel[RawEvent | Invalid]
    done: trio.MemorySendChannel[Outcome]
    stopping: trio.Event
    stored: Callable[[dt.datetime], None] = lambda due: None
    #: a source wrote outbox rows itself (an agent's reply): wakes this process's delivery
    queued: Callable[[], None] = lambda: None

    def clone(self) -> Inlets:
        return Inlets(self.raw.clone(), self.done.clone(), self.stopping, self.stored,
                      self.queued)

    def close(self) -> None:
        for channel in (self.raw, self.done):
            channel.close()


#: a source reads events until it is exhausted or ``inlets.stopping`` is set
Source = Callable[[Inlets], Awaitable[None]]


@attrs.define
class Pipeline:
    """One run of the stage graph. ``stop_sources()`` starts a graceful shutdown.

    ``clock`` is the time turns are decided on (wall clock live, recorded time in a replay;
    by default the wall clock when ``finite`` is false, else the event time of the input --
    the latest ``received_at`` stored, see :class:`pipeline.claims.Watermark`);
    ``poll_s`` how often the claimer looks for work written by other processes (None: a
    replay, where this process wrote everything); ``finite``: the sources end by themselves
    and the run ends once all their work is done (a replay), not at a signal.
    """

    cfg: Config
    store: Store
    sink: OutcomeSink
    metrics: Metrics = attrs.field(factory=Metrics)
    clock: WorkClock | None = None
    poll_s: float | None = None
    finite: bool = True
    roles: frozenset[str] = frozenset({"webhook", "turns", "delivery"})
    #: each instance's responder, instead of those the config builds (simulations)
    responders: dict[str, Responder] | None = None
    #: what the context stage and dispatch use instead of the store (tests put faults there)
    context_queries: ContextQueries | None = None
    commits: Commits | None = None
    stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    wake: Notifier = attrs.field(factory=Notifier, init=False)
    deliveries: DeliveryStats = attrs.field(factory=DeliveryStats, init=False)
    loader: ContextLoader | None = attrs.field(default=None, init=False)
    claimer: Claimer | None = attrs.field(default=None, init=False)
    _work: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    def stop_sources(self) -> None:
        """Ask every source to stop reading and the claimer to stop claiming; what is in
        flight is finished -- or cancelled a moment before the grace ends, so that its
        conversations can be given back within it."""
        self.stopping.set()
        if self.claimer is not None:
            self.claimer.wake.notify()
        grace = self.cfg.pipeline.shutdown_grace_s
        self._work.deadline = min(self._work.deadline, trio.current_time()
                                  + max(0.0, grace - min(RELEASE_S, grace / 4)))

    async def run(self, *sources: Source,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until every source has ended and everything it handed over is through."""
        await self.store.seed_instances(instance_rows(self.cfg))
        stop_delivery = trio.Event()
        async with httpx.AsyncClient() as http, trio.open_nursery() as outer:
            if "delivery" in self.roles and not all(dry_instances(self.cfg).values()):
                outbox = OutboxStore(self.store.pool, self.cfg.database.query_timeout_s)
                await outer.start(partial(run_delivery, self.cfg, outbox, wake=self.wake,
                                          stopping=stop_delivery, stats=self.deliveries,
                                          drain=self.finite))
            if not self.finite and self.roles & {"delivery", "turns"}:
                retention = RetentionStore(self.store.pool, self.cfg.database.query_timeout_s)
                await outer.start(partial(run_retention, self.cfg.retention, retention,
                                          stopping=stop_delivery))
            with self._work:
                async with trio.open_nursery() as nursery:
                    inlets = await self._start_stages(nursery, http)
                    task_status.started()
                    for source in sources:
                        nursery.start_soon(_run_source, source, inlets.clone())
                    inlets.close()
            if self._work.cancelled_caught and self.claimer is not None:
                await self._give_back(self.claimer)
            stop_delivery.set()  # the stages have drained: deliver what is due, then stop

    async def _give_back(self, claimer: Claimer) -> None:
        held = claimer.held()
        try:
            released = await claimer.release_held()
        except DatabaseError as exc:
            logger.bind(stage="claims").warning(
                "{} conversations cancelled at shutdown could not be given back ({}); "
                "their leases expire in {} s", len(held), exc, self.cfg.pipeline.lease_s)
            return
        if released:
            logger.bind(stage="claims").warning(
                "{} turns cancelled at shutdown: their conversations were given back and "
                "are redone by the next process that claims them", released)

    async def _start_stages(self, nursery: trio.Nursery, http: httpx.AsyncClient) -> Inlets:
        cfg, m = self.cfg, self.metrics
        cap = cfg.pipeline.channel_capacity
        rules = burst_rules(cfg)
        (done, done_r) = trio.open_memory_channel[Outcome](cap)
        # intake writes what is waiting in one statement: its channel bounds the batch
        (raw, raw_r) = trio.open_memory_channel[RawEvent | Invalid](cfg.pipeline.intake_batch)
        await nursery.start(collect_outcomes, done_r, self.sink)
        intake_done = trio.Event()
        claimer = None
        watermark = None
        if self.clock is None:
            if self.finite:
                watermark = Watermark()
                self.clock = watermark.clock()
            else:
                self.clock = wall_clock()
        if "turns" in self.roles:
            turns, turns_r = trio.open_memory_channel[Turn](cap)
            claimer = self.claimer = Claimer(
                self.store, rules, turns, done.clone(), self.clock,
                cfg.pipeline.max_active_conversations, cfg.pipeline.lease_s, self.poll_s,
                self.stopping, intake_done if self.finite else None,
                renew=self.poll_s is not None, metrics=m,
                context=ContextRequest(cfg.context.history_chars, cfg.context.recent_interactions,
                                       cfg.escalation.min_confidence)
                if cfg.context.mode == "claimed" else None)
            await self._start_turn_stages(nursery, turns_r, done.clone(), http, claimer)
            await nursery.start(claimer.run)
            if watermark is not None:
                watermark.on_advance = claimer.wake.poke
        def stored(due: dt.datetime) -> None:
            if claimer is not None:
                claimer.wake.due(due)

        intake = Intake(self.store, instance_directory(cfg), done.clone(),
                        database_retry(cfg.database),
                        rules.first_due, stored,
                        watermark.advance if watermark is not None else lambda latest: None,
                        receipts=not all(dry_instances(cfg).values()),
                        phone="off" if self.finite else phone_rule(cfg))
        def intake_ended() -> None:
            intake_done.set()
            if watermark is not None:
                watermark.end()
            if claimer is not None:  # it may wait with nothing due: time to look, and end
                claimer.wake.notify()

        await nursery.start(_intake, intake, raw_r, done.clone(), m, cfg.pipeline.intake_batch,
                            intake_ended)
        return Inlets(raw, done, self.stopping, stored, self.wake.notify)

    async def _start_turn_stages(self, nursery: trio.Nursery,
                                 turns: trio.MemoryReceiveChannel[Turn],
                                 done: trio.MemorySendChannel[Outcome],
                                 http: httpx.AsyncClient, claimer: Claimer) -> None:
        """context → escalation → respond → dispatch, each turn of a different conversation
        (a claim hands out one turn per conversation at a time)."""
        cfg, store, m = self.cfg, self.store, self.metrics
        cap = cfg.pipeline.channel_capacity

        async def drop_turn(turn: Turn, exc: Exception) -> list[Any]:
            logger.bind(stage="turn", conversation=turn.key).error(
                "turn {} of {}/{} failed; its conversation is given back and the turn is "
                "redone after a pause: {}", turn.turn_id, turn.instance, turn.sender, exc)
            if turn.claim is not None:
                await claimer.failed(turn.claim, exc)
            return []

        keyed = {"max_active": cfg.pipeline.max_active_conversations, "lane_capacity": cap,
                 "on_error": drop_turn}
        esc = cfg.escalation
        handover = {i.name: Messages(esc.handover_message, esc.out_of_hours_message)
                    for i in cfg.instances}
        instances = InstanceCache(store, cfg.context.instance_cache_ttl_s)
        await nursery.start(instances.run)
        min_conf = cfg.escalation.min_confidence
        queries = self.context_queries or store
        loader = self.loader = ContextLoader(queries, cfg.context, instances, min_conf, m)
        if cfg.context.mode == "batched":
            loader.batcher = ContextBatcher(queries, cfg.context,
                                            concurrency=max(1, cfg.database.pool_size // 2),
                                            min_confidence=min_conf)
            await nursery.start(loader.batcher.run)
        rules = escalation_rules(cfg)
        clock = claimer.clock
        retry = database_retry(cfg.database)
        commits: Commits = self.commits or store
        ended: list[Callable[[], None]] = [instances.close]
        if self.commits is None:  # turns ending together share one commit statement
            shared = SharedCommits(store, writers=max(1, cfg.database.pool_size // 4),
                                   on_batch=m.tally("commit batches"))
            await nursery.start(shared.run)
            commits = shared
            ended.append(shared.close)
        path = [
            TurnStage("context", LoadContext(RetriedContexts(loader, retry)),
                      loader.batcher.close if loader.batcher else None),
            TurnStage("escalation", Escalation(rules)),
            TurnStage("respond", Respond(self.responders or responders(cfg, http), rules)),
            TurnStage("dispatch", Dispatch(
                RetriedCommits(commits, retry), handover, dry_instances(cfg),
                claimer.finished, (lambda: None) if clock.database else clock.now,
                burst_rules(cfg).first_due, self.wake.notify),
                partial(_call_all, ended)),
        ]
        await nursery.start(_run_turn_path, path, turns, done, m, keyed)


def _call_all(calls: Sequence[Callable[[], None]]) -> None:
    for call in calls:
        call()


async def _run_source(source: Source, inlets: Inlets) -> None:
    try:
        await source(inlets)
    finally:
        inlets.close()


async def _intake(intake: Intake, recv: Any, send: Any, metrics: Metrics, cap: int,
                  ended: Callable[[], None], task_status: trio.TaskStatus[None]) -> None:
    """Intake as a batch stage; ``ended`` is called once everything it read is in the
    inbox."""
    try:
        with intake.done:
            await batch_stage(intake, recv, send, metrics.stage("intake"), max_batch=cap,
                              task_status=task_status)
    finally:
        ended()


@attrs.frozen
class TurnStage:
    """One stage of the turn path: ``handler`` takes a turn and gives what goes on (turns;
    outcomes for the last); ``ended`` runs once the path has stopped (a helper service it
    used closes then)."""

    name: str
    handler: Callable[[Turn], Awaitable[Sequence[Any]]]
    ended: Callable[[], None] | None = None


async def _run_turn_path(path: Sequence[TurnStage], recv: trio.MemoryReceiveChannel[Turn],
                         send: trio.MemorySendChannel[Outcome], metrics: Metrics,
                         keyed: dict[str, Any], task_status: trio.TaskStatus[None]) -> None:
    """The turn stages in one set of per-conversation lanes (:func:`keyed_path`): a turn is
    handed over once, not once per stage; each stage keeps its own figures."""
    try:
        await keyed_path([(stage.handler, metrics.stage(stage.name)) for stage in path],
                         recv, send, task_status=task_status, **keyed)
    finally:
        for stage in path:
            if stage.ended is not None:
                stage.ended()
