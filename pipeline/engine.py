"""The stage graph: intake → dedupe → turns → context → escalation → respond → dispatch →
outcomes, built from the config and run in one nursery.

Nurseries are nested by lifetime (STYLE rule 6): the store is opened by the caller, the stages
live in :func:`run_stages`' nursery, and the source is started last, inside a cancel scope of
its own so that a shutdown can stop reading while the stages drain what was accepted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import attrs
import httpx
import trio
from loguru import logger

from pipeline.concurrency import Backoff
from pipeline.config import Config
from pipeline.delivery import DeliveryStats, Notifier, run_delivery
from pipeline.gate import ConversationGate
from pipeline.instances import InstanceCache
from pipeline.metrics import Metrics
from pipeline.outbox import OutboxStore
from pipeline.records import Invalid, Outcome, RawEvent, Stored, Turn
from pipeline.runtime import batch_stage, keyed_stage, sequential_stage
from pipeline.store import InstanceRow, Store
from stages.context import ContextBatcher, ContextLoader, LoadContext
from stages.dedupe import Dedupe, TextDeduper
from stages.dispatch import Dispatch, Messages
from stages.escalation import Escalation, EscalationRules, rules_from_config
from stages.intake import Intake
from stages.outcomes import OutcomeSink, collect_outcomes
from stages.parse import InstanceDirectory
from stages.respond import Respond, Responder, build_responder
from stages.turns import BurstBuffer, assemble_turns


def instance_rows(cfg: Config) -> list[InstanceRow]:
    return [InstanceRow(i.name, i.phone_number_id, i.evolution_instance,
                        {"webhook_url": i.webhook_url, "responder": i.responder})
            for i in cfg.instances]


def escalation_rules(cfg: Config) -> dict[str, EscalationRules]:
    """Each instance's rules: the ``[escalation]`` defaults refined by the instance."""
    return {i.name: rules_from_config(cfg.escalation, i) for i in cfg.instances}


def responders(cfg: Config, client: httpx.AsyncClient | None) -> dict[str, Responder]:
    """The responder of each instance; instances naming the same responder share one.
    ``client`` is the HTTP client of the ``openai`` responders."""
    built = {name: build_responder(name, cfg.responders[name], client)
             for name in dict.fromkeys(i.responder for i in cfg.instances)}
    return {i.name: built[i.responder] for i in cfg.instances}


def burst_buffer(cfg: Config) -> BurstBuffer:
    buf = cfg.intake.buffer
    return BurstBuffer(dt.timedelta(milliseconds=buf.window_ms), buf.max_messages,
                       dt.timedelta(milliseconds=buf.max_wait_ms) if buf.max_wait_ms else None)


_TURN_ACTIONS = frozenset({"replied", "escalated", "held", "merged"})

#: while the database is unavailable, stages wait and retry (about two minutes) rather
#: than fail their turns; a turn that still fails stays pending for the next start
DB_RETRY = Backoff(attempts=60, initial_s=0.1, max_s=5.0, deadline_s=120.0)


@attrs.frozen
class Inlets:
    """Where a source puts what it reads; each source gets its own clones and closes them.

    ``raw`` goes through intake (parse, store); ``stored`` is for messages the source has
    already written to the inbox (the webhook acknowledges only after that); ``done`` takes
    outcomes the source settled itself. ``stopping`` is set when the pipeline shuts down:
    sources finish what they hold and return.
    """

    raw: trio.MemorySendChannel[RawEvent | Invalid]
    stored: trio.MemorySendChannel[Stored]
    done: trio.MemorySendChannel[Outcome]
    stopping: trio.Event

    def clone(self) -> Inlets:
        return Inlets(self.raw.clone(), self.stored.clone(), self.done.clone(), self.stopping)

    def close(self) -> None:
        for channel in (self.raw, self.stored, self.done):
            channel.close()


#: a source reads events until it is exhausted or ``inlets.stopping`` is set
Source = Callable[[Inlets], Awaitable[None]]


@attrs.define
class Pipeline:
    """One run of the stage graph. ``stop_sources()`` starts a graceful shutdown."""

    cfg: Config
    store: Store
    sink: OutcomeSink
    metrics: Metrics = attrs.field(factory=Metrics)
    wall_clock: Callable[[], dt.datetime] | None = None
    stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    gate: ConversationGate = attrs.field(factory=ConversationGate, init=False)
    wake: Notifier = attrs.field(factory=Notifier, init=False)
    deliveries: DeliveryStats = attrs.field(factory=DeliveryStats, init=False)
    loader: ContextLoader | None = attrs.field(default=None, init=False)
    dedupe: Dedupe | None = attrs.field(default=None, init=False)

    def _finished(self, outcome: Outcome, _at: float) -> None:
        """A turn's message is done: dedupe no longer counts it as in flight."""
        if outcome.action in _TURN_ACTIONS and self.dedupe and outcome.message_id:
            self.dedupe.finished(outcome.instance or "", outcome.message_id)

    def stop_sources(self) -> None:
        """Ask every source to stop reading; what they already handed over is finished."""
        self.stopping.set()

    async def run(self, *sources: Source,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until every source has ended and everything it handed over is through."""
        await self.store.seed_instances(instance_rows(self.cfg))
        stop_delivery = trio.Event()
        async with httpx.AsyncClient() as http, trio.open_nursery() as outer:
            if self.cfg.dispatch.transport != "dry":  # dry rows are written as delivered
                outbox = OutboxStore(self.store.pool, self.cfg.database.query_timeout_s)
                await outer.start(partial(run_delivery, self.cfg, outbox, wake=self.wake,
                                          stopping=stop_delivery, stats=self.deliveries))
            async with trio.open_nursery() as nursery:
                inlets = await self._start_stages(nursery, http)
                task_status.started()
                for source in sources:
                    nursery.start_soon(_run_source, source, inlets.clone())
                inlets.close()
            stop_delivery.set()  # the stages have drained: deliver what is due, then stop

    async def _start_stages(self, nursery: trio.Nursery, http: httpx.AsyncClient) -> Inlets:
        cfg, m = self.cfg, self.metrics
        cap = cfg.pipeline.channel_capacity

        def channel() -> tuple[trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]]:
            return trio.open_memory_channel[Any](cap)

        (done, done_r), (raw, raw_r), (stored, stored_r) = channel(), channel(), channel()
        (fresh, fresh_r), (turns, turns_r) = channel(), channel()
        await nursery.start(collect_outcomes, done_r, self.sink)
        intake = Intake(self.store, instance_directory(cfg), done.clone(), DB_RETRY)
        await nursery.start(_closing, intake.done, batch_stage, intake, raw_r, stored.clone(),
                            m.stage("intake"), {"max_batch": cap})
        texts = TextDeduper(dt.timedelta(seconds=cfg.dedupe.content_window_s))
        dedupe = self.dedupe = Dedupe(texts, self.store, done.clone(), DB_RETRY)
        self.sink.observers.append(self._finished)
        await nursery.start(_closing, dedupe.done, sequential_stage, dedupe, stored_r, fresh,
                            m.stage("dedupe"), {})
        await nursery.start(_assemble, fresh_r, turns, burst_buffer(cfg), m, self.wall_clock)
        await self._start_turn_stages(nursery, turns_r, done.clone(), http)
        return Inlets(raw, stored, done, self.stopping)

    async def _start_turn_stages(self, nursery: trio.Nursery, turns: Any, done: Any,
                                 http: httpx.AsyncClient) -> None:
        """context → escalation → respond → dispatch: per-conversation lanes."""
        cfg, store, m, gate = self.cfg, self.store, self.metrics, self.gate
        cap = cfg.pipeline.channel_capacity

        async def drop_turn(turn: Turn, exc: Exception) -> list[Any]:
            gate.leave(turn.key)
            for msg in turn.messages:  # pending again: a redelivery may bring it back
                if self.dedupe is not None:
                    self.dedupe.finished(msg.instance, msg.message_id)
            logger.bind(stage="turn", conversation=turn.key).error(
                "turn {} of {}/{} failed and stays pending in the inbox: {}",
                turn.turn_id, turn.instance, turn.sender, exc)
            m.counters["failed turns"] += 1
            return []

        keyed = {"max_active": cfg.pipeline.max_active_conversations, "lane_capacity": cap,
                 "on_error": drop_turn}
        esc = cfg.escalation
        handover = {i.name: Messages(esc.handover_message, esc.out_of_hours_message)
                    for i in cfg.instances}
        instances = InstanceCache(store, cfg.context.instance_cache_ttl_s)
        await nursery.start(instances.run)
        min_conf = cfg.escalation.min_confidence
        loader = self.loader = ContextLoader(store, cfg.context, instances, min_conf, m)
        if cfg.context.mode == "batched":
            loader.batcher = ContextBatcher(store, cfg.context,
                                            concurrency=max(1, cfg.database.pool_size // 2),
                                            min_confidence=min_conf)
            await nursery.start(loader.batcher.run)
        rules = escalation_rules(cfg)
        handlers = [
            ("context", LoadContext(loader, gate, DB_RETRY)),
            ("escalation", Escalation(rules)),
            ("respond", Respond(responders(cfg, http), rules)),
        ]
        recv = turns
        for name, handler in handlers:
            send, next_recv = trio.open_memory_channel[Any](cap)
            then = loader.batcher.close if name == "context" and loader.batcher else None
            await nursery.start(_call, keyed_stage, handler, recv, send, m.stage(name), keyed,
                                then)
            recv = next_recv
        dispatch = Dispatch(store, gate, handover, cfg.dispatch.transport, self.wake.notify,
                            DB_RETRY)
        await nursery.start(_call, keyed_stage, dispatch, recv, done, m.stage("dispatch"), keyed,
                            instances.close)


def instance_directory(cfg: Config) -> InstanceDirectory:
    return InstanceDirectory(cfg.instance_by_phone_number_id, cfg.instance_by_evolution_name)


async def _run_source(source: Source, inlets: Inlets) -> None:
    try:
        await source(inlets)
    finally:
        inlets.close()


async def _assemble(recv: Any, send: Any, buffer: BurstBuffer, metrics: Metrics,
                    wall_clock: Any, task_status: trio.TaskStatus[None]) -> None:
    await assemble_turns(recv, send, buffer, metrics.stage("turns"), wall_clock=wall_clock,
                         task_status=task_status)


async def _call(runner: Any, handler: Any, recv: Any, send: Any, stats: Any,
                kwargs: dict[str, Any], then: Callable[[], None] | None,
                task_status: trio.TaskStatus[None]) -> None:
    """Run a stage; ``then`` (e.g. closing a helper service) runs when it has ended."""
    try:
        await runner(handler, recv, send, stats, task_status=task_status, **kwargs)
    finally:
        if then is not None:
            then()


async def _closing(extra: trio.MemorySendChannel[Any], runner: Any, handler: Any, recv: Any,
                   send: Any, stats: Any, kwargs: dict[str, Any],
                   task_status: trio.TaskStatus[None]) -> None:
    """Run a stage that also reports to the outcomes, closing that clone when it ends."""
    with extra:
        await runner(handler, recv, send, stats, task_status=task_status, **kwargs)
