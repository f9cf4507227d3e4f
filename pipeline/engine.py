"""The stage graph: intake → dedupe → turns → context → escalation → respond → dispatch →
outcomes, built from the config and run in one nursery.

Nurseries are nested by lifetime (STYLE rule 6): the store is opened by the caller, the stages
live in :func:`run_stages`' nursery, and the source is started last, inside a cancel scope of
its own so that a shutdown can stop reading while the stages drain what was accepted.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from loguru import logger

from pipeline.config import Config
from pipeline.gate import ConversationGate
from pipeline.metrics import Metrics
from pipeline.records import Invalid, Outcome, RawEvent, Turn
from pipeline.runtime import batch_stage, keyed_stage, sequential_stage
from pipeline.store import InstanceRow, Store
from stages.context import LoadContext
from stages.dedupe import Dedupe, TextDeduper
from stages.dispatch import Dispatch
from stages.escalation import Escalation, EscalationRules
from stages.intake import Intake
from stages.outcomes import OutcomeSink, collect_outcomes
from stages.parse import InstanceDirectory
from stages.respond import Respond, Rule, RulesResponder
from stages.turns import BurstBuffer, assemble_turns

#: a source writes raw events (or invalid-line reports) and closes the channel when done
Source = Callable[[trio.MemorySendChannel[RawEvent | Invalid]], Awaitable[None]]


def instance_rows(cfg: Config) -> list[InstanceRow]:
    return [InstanceRow(i.name, i.phone_number_id, i.evolution_instance,
                        {"webhook_url": i.webhook_url, "responder": i.responder})
            for i in cfg.instances]


def escalation_rules(cfg: Config) -> dict[str, EscalationRules]:
    base = cfg.escalation
    return {
        i.name: EscalationRules(
            keywords=(*base.keywords, *i.escalation_keywords),
            max_failed_answers=i.max_failed_answers or base.max_failed_answers,
        )
        for i in cfg.instances
    }


def responders(cfg: Config) -> dict[str, RulesResponder]:
    """The responder of each instance. Only ``rules`` responders exist so far."""
    out = {}
    for inst in cfg.instances:
        rc = cfg.responders[inst.responder]
        if rc.kind != "rules":
            raise NotImplementedError(
                f"responder {inst.responder!r} of kind {rc.kind!r} is not implemented yet; "
                "use kind = \"rules\"")
        out[inst.name] = RulesResponder(
            inst.responder, tuple(Rule(r.match, r.reply, r.confidence) for r in rc.rules),
            rc.fallback)
    return out


def burst_buffer(cfg: Config) -> BurstBuffer:
    buf = cfg.intake.buffer
    return BurstBuffer(dt.timedelta(milliseconds=buf.window_ms), buf.max_messages,
                       dt.timedelta(milliseconds=buf.max_wait_ms) if buf.max_wait_ms else None)


@attrs.define
class Pipeline:
    """One run of the stage graph. ``stop_sources()`` starts a graceful shutdown."""

    cfg: Config
    store: Store
    sink: OutcomeSink
    metrics: Metrics = attrs.field(factory=Metrics)
    wall_clock: Callable[[], dt.datetime] | None = None
    _source_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)

    def stop_sources(self) -> None:
        self._source_scope.cancel()

    async def run(self, source: Source,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the source ends (or is stopped) and everything accepted is through."""
        await self.store.seed_instances(instance_rows(self.cfg))
        async with trio.open_nursery() as nursery:
            raw_send = await self._start_stages(nursery)
            task_status.started()
            nursery.start_soon(self._run_source, source, raw_send)

    async def _run_source(self, source: Source,
                          send: trio.MemorySendChannel[RawEvent | Invalid]) -> None:
        with send, self._source_scope:
            await source(send)

    async def _start_stages(self, nursery: trio.Nursery) -> trio.MemorySendChannel[Any]:
        cfg, store, m = self.cfg, self.store, self.metrics
        cap, lanes = cfg.pipeline.channel_capacity, cfg.pipeline.max_active_conversations

        def channel() -> tuple[trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]]:
            return trio.open_memory_channel[Any](cap)

        done_send, done_recv = trio.open_memory_channel[Outcome](cap)
        await nursery.start(collect_outcomes, done_recv, self.sink)
        directory = InstanceDirectory(cfg.instance_by_phone_number_id,
                                      cfg.instance_by_evolution_name)
        raw_send, raw_recv = channel()
        stored_send, stored_recv = channel()
        fresh_send, fresh_recv = channel()
        turns_send, turns_recv = channel()
        ctx_send, ctx_recv = channel()
        dec_send, dec_recv = channel()
        rep_send, rep_recv = channel()
        intake = Intake(store, directory, done_send.clone())
        await nursery.start(_closing, intake.done, batch_stage, intake, raw_recv, stored_send,
                            m.stage("intake"), {"max_batch": cap})
        dedupe = Dedupe(TextDeduper(dt.timedelta(seconds=cfg.dedupe.content_window_s)), store,
                        done_send.clone())
        await nursery.start(_closing, dedupe.done, sequential_stage, dedupe, stored_recv,
                            fresh_send, m.stage("dedupe"), {})
        buffer = burst_buffer(cfg)
        await nursery.start(_assemble, fresh_recv, turns_send, buffer, m, self.wall_clock)
        gate = ConversationGate()

        async def drop_turn(turn: Turn, exc: Exception) -> list[Any]:
            gate.leave(turn.key)
            logger.bind(stage="turn", conversation=turn.key).error(
                "turn {} of {}/{} failed and stays pending in the inbox: {}",
                turn.turn_id, turn.instance, turn.sender, exc)
            m.counters["failed turns"] += 1
            return []

        keyed = {"max_active": lanes, "lane_capacity": cap, "on_error": drop_turn}
        context = LoadContext(store, gate, cfg.context.history_chars,
                              cfg.context.recent_interactions)
        await nursery.start(_call, keyed_stage, context, turns_recv, ctx_send,
                            m.stage("context"), keyed)
        await nursery.start(_call, keyed_stage, Escalation(escalation_rules(cfg)), ctx_recv,
                            dec_send, m.stage("escalation"), keyed)
        await nursery.start(_call, keyed_stage, Respond(responders(cfg)), dec_recv, rep_send,
                            m.stage("respond"), keyed)
        handover = {i.name: cfg.escalation.handover_message for i in cfg.instances}
        dispatch = Dispatch(store, gate, handover, cfg.dispatch.transport)
        await nursery.start(_call, keyed_stage, dispatch, rep_recv, done_send,
                            m.stage("dispatch"), keyed)
        return raw_send


async def _assemble(recv: Any, send: Any, buffer: BurstBuffer, metrics: Metrics,
                    wall_clock: Any, task_status: trio.TaskStatus[None]) -> None:
    await assemble_turns(recv, send, buffer, metrics.stage("turns"), wall_clock=wall_clock,
                         task_status=task_status)


async def _call(runner: Any, handler: Any, recv: Any, send: Any, stats: Any,
                kwargs: dict[str, Any], task_status: trio.TaskStatus[None]) -> None:
    await runner(handler, recv, send, stats, task_status=task_status, **kwargs)


async def _closing(extra: trio.MemorySendChannel[Any], runner: Any, handler: Any, recv: Any,
                   send: Any, stats: Any, kwargs: dict[str, Any],
                   task_status: trio.TaskStatus[None]) -> None:
    """Run a stage that also reports to the outcomes, closing that clone when it ends."""
    with extra:
        await runner(handler, recv, send, stats, task_status=task_status, **kwargs)
