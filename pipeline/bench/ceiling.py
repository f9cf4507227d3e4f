"""The ceiling: the SQL a turn needs in mode ``single`` with no stages around it -- the
messages/s the database itself allows, which each mode is read against."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from pipeline.bench.measure import CpuMeter, cpu_ms_per_msg, warm_up
from pipeline.bench.server import Route, fresh_database, run_dbname
from pipeline.bench.settings import AFTER_ALL, RULES, BenchError, Settings, bench_config
from pipeline.bench.tracking import BenchStore, TurnMirror, wake_if_idle
from pipeline.bench.workload import BenchEvent
from pipeline.claims import Claimer, WorkClock
from pipeline.config import Config
from pipeline.db import open_pool
from pipeline.engine import instance_rows
from pipeline.rules import burst_rules
from pipeline.store import Store
from stages.dispatch import Messages, effects, turn_commit
from stages.records import Decision, InboundMessage, Outcome, Reply, Turn


@attrs.frozen
class CeilingPlan:
    """The workload's inbox rows, which of them ask for a human, and how many turns the
    burst rule makes of them (the ceiling checks that it committed exactly these)."""

    inbox: tuple[InboundMessage, ...]
    escalating: frozenset[str]
    turns: int
    messages: int


def plan_ceiling(settings: Settings, events: Iterable[BenchEvent]) -> CeilingPlan:
    mirror = TurnMirror(burst_rules(bench_config(settings, "single")))
    inbox: list[InboundMessage] = []
    escalating: set[str] = set()
    count = turns = 0
    for item in events:
        count += 1
        if item.redelivery:
            continue
        inbox.append(item.message)
        escalating.update([item.message.message_id] if item.escalates else [])
        turns += len(mirror.add(item.message))
    turns += len(mirror.flush())
    return CeilingPlan(tuple(inbox), frozenset(escalating), turns, count)


async def run_ceiling(settings: Settings, route: Route, plan: CeilingPlan,
                      rep: int) -> dict[str, Any]:
    """The turns' SQL with no stages around it: messages/s the database allows."""
    cfg = bench_config(settings, "single")
    rules = burst_rules(cfg)
    async with fresh_database(route.server, run_dbname("ceiling", rep)) as name, \
            open_pool(route.conninfo(name), settings.pool_size) as pool:
        await warm_up(pool)
        store = BenchStore(pool, cfg.database.query_timeout_s)
        await store.seed_instances(instance_rows(cfg))
        for i in range(0, len(plan.inbox), 500):  # untimed: intake's part
            await store.store_inbound(plan.inbox[i:i + 500], rules.first_due)
        after_all = plan.inbox[-1].received_at + AFTER_ALL  # every turn is closed
        before, meter = store.round_trips, CpuMeter(route)
        turns_send, turns_recv = trio.open_memory_channel[Turn](settings.channel_capacity)
        done_send, done_recv = trio.open_memory_channel[Outcome](settings.channel_capacity)
        ended = trio.Event()
        ended.set()  # the inbox holds everything: the claimer returns when it is done
        claimer = Claimer(store, rules, turns_send, done_send,
                          WorkClock(lambda: after_all, lambda _t: trio.current_time()),
                          settings.active, cfg.pipeline.lease_s, None, trio.Event(), ended,
                          renew=False)
        committed: list[Turn] = []
        cpu_before, start = meter.sample(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, done_recv)
            for _ in range(settings.ceiling_tasks):
                nursery.start_soon(_ceiling_task, store, cfg, claimer, turns_recv,
                                   plan.escalating, committed)
            await claimer.run()
        elapsed = time.perf_counter() - start
        cpu = cpu_ms_per_msg(cpu_before, meter.sample(), plan.messages)
        if len(committed) != plan.turns:
            raise BenchError(f"the ceiling committed {len(committed)} turns, not the "
                             f"{plan.turns} of the workload")
        return {"msgs_per_s": plan.messages / elapsed, "turns_per_s": plan.turns / elapsed,
                "cpu_ms_per_msg": cpu, "turns": plan.turns, "messages": plan.messages,
                "elapsed_s": elapsed, "round_trips": store.round_trips - before,
                "claims": store.claims,
                "round_trips_per_msg": (store.round_trips - before) / plan.messages,
                "claim_to_commit_p50_ms": store.claim_to_commit.percentile(50),
                "claim_to_commit_p99_ms": store.claim_to_commit.percentile(99),
                "peak_connections": pool.stats.peak_in_use}


async def _drain(recv: trio.MemoryReceiveChannel[Outcome]) -> None:
    async for _ in recv:
        pass


async def _ceiling_task(store: Store, cfg: Config, claimer: Claimer,
                        turns: trio.MemoryReceiveChannel[Turn], escalating: frozenset[str],
                        committed: list[Turn]) -> None:
    """Claimed turns, one after the other: load the context, decide (as the rules would),
    commit; tell the claimer, as dispatch does."""
    messages = Messages(cfg.escalation.handover_message, cfg.escalation.out_of_hours_message)
    first_due = burst_rules(cfg).first_due
    async for turn in turns:
        assert turn.claim is not None
        ctx = await store.load_context(turn, cfg.context.history_chars,
                                       cfg.context.recent_interactions)
        escalates = any(m.message_id in escalating for m in turn.messages)
        decision = Decision("escalate", "explicit request") if escalates else Decision("reply")
        reply = None if escalates else Reply(RULES[0]["reply"], 0.9, False, "rules")
        decided = attrs.evolve(turn, context=ctx, decision=decision, reply=reply)
        commit = turn_commit(decided, effects(decided, messages, delivered=True), first_due,
                             claimer.clock.now())
        done = await store.commit_claim(commit)
        claimer.finished(turn.claim, done.next_due)
        committed.append(turn)
        wake_if_idle(claimer)
