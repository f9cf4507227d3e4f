"""The context stage's four modes against the real database: identical outcomes, no
hold-and-wait, per-load timeouts and policies, batching."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import trio
import trio.testing
from conftest import sql
from test_pipeline import SAMPLE_ACTIONS, log_source, make_config

from pipeline.cli import sample_log
from pipeline.config import Config, parse_config
from pipeline.context import ContextQueries
from pipeline.db import DatabaseError, DatabaseUnavailable, open_pool
from pipeline.engine import Pipeline
from pipeline.store import Store
from stages.outcomes import OutcomeSink

MODES = ("sequential", "parallel", "single", "batched", "claimed")
TABLES = "inbox, messages, ai_interactions, escalations, outbox, dead_letters, conversations"


def mode_config(mode: str, **context: Any) -> Config:
    base = make_config()
    data = {
        "pipeline": {"channel_capacity": 4, "max_active_conversations": 8},
        "context": {"mode": mode, **context},
        "responders": {"rules": {"kind": "rules", "rules": [
            {"match": r.match, "reply": r.reply} for r in base.responders["rules"].rules]}},
        "instances": [{"name": "demo", "phone_number_id": "1122334455667"},
                      {"name": "loja", "evolution_instance": "loja"}],
    }
    return parse_config(data, "test")


async def replay(store: Store, cfg: Config, queries: ContextQueries | None = None,
                 ) -> tuple[list[str], Pipeline]:
    sink = OutcomeSink(out=io.StringIO())
    pipeline = Pipeline(cfg, store, sink, context_queries=queries)
    await pipeline.run(log_source(sample_log()))
    assert sink.out is not None
    lines = []
    for line in sink.out.getvalue().splitlines():  # type: ignore[attr-defined]
        record = json.loads(line)
        record.pop("timings_ms")
        record.pop("conversation_id")
        lines.append(json.dumps(record, sort_keys=True))
    return sorted(lines), pipeline


def history(conninfo: str) -> list[tuple[object, ...]]:
    return sql(conninfo, "SELECT c.instance, c.sender, m.role, m.body, m.message_id"
               " FROM messages m JOIN conversations c ON c.id = m.conversation_id"
               " ORDER BY c.instance, c.sender, m.id")


async def test_every_mode_gives_identical_outcomes(store: Store, conninfo: str) -> None:
    results = {}
    for mode in MODES:
        sql(conninfo, f"TRUNCATE {TABLES} CASCADE")
        outcomes, _ = await replay(store, mode_config(mode))
        results[mode] = (outcomes, history(conninfo))
    baseline = results["sequential"]
    assert len(baseline[0]) == 108
    for mode in MODES[1:]:
        assert results[mode][0] == baseline[0], mode
        assert results[mode][1] == baseline[1], mode


#: the statements outside the context stage: how many of them there are depends on how
#: intake's batches fell and when a claim looked, not on the context mode
class Counting:
    """The context's statements (:class:`pipeline.context.ContextQueries`) through the real
    store, counted: one call is one statement."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await method(*args, **kwargs)
        return counted


async def test_round_trips_per_mode(store: Store, conninfo: str) -> None:
    trips = {}
    for mode in MODES:
        sql(conninfo, f"TRUNCATE {TABLES} CASCADE")
        counting = Counting(store)
        await replay(store, mode_config(mode), counting)
        trips[mode] = counting.calls
    print(trips)
    assert trips["sequential"] == trips["parallel"]
    assert trips["single"] < trips["parallel"]
    assert trips["batched"] <= trips["single"]
    assert trips["claimed"] == 0  # the claims load the context: no statement of its own


async def test_no_hold_and_wait_with_more_conversations_than_connections(
    conninfo: str,
) -> None:
    async with open_pool(conninfo, 2) as pool:
        store = Store(pool, query_timeout_s=30)
        cfg = parse_config({
            "pipeline": {"max_active_conversations": 64, "channel_capacity": 64},
            "context": {"mode": "parallel"},
            "instances": [{"name": "demo", "phone_number_id": "1122334455667"},
                          {"name": "loja"}],
        }, "test")
        with trio.fail_after(60):
            _, pipeline = await replay(store, cfg)
        assert pool.stats.peak_in_use <= 2
        assert pipeline.metrics.stages["context"].errors == 0
    assert sql(conninfo, "SELECT count(*) FROM inbox WHERE status = 'pending'") == [(0,)]


class Faulty:
    """The context's statements through the real store, with one load made slow or failing
    (fault injection); the other statements go straight through."""

    def __init__(self, store: Store, *, slow: str = "", failing: str = "",
                 outage: str = "", outage_calls: int = 0) -> None:
        self.store = store
        self.slow, self.failing = slow, failing
        self.outage, self.outage_calls = outage, outage_calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def _maybe(self, name: str) -> None:
        if name == self.slow:
            await trio.sleep_forever()  # until the load's timeout cancels it
        if name == self.failing:
            raise DatabaseError(f"{name} load failed on purpose")
        if name == self.outage and self.outage_calls > 0:
            self.outage_calls -= 1
            raise DatabaseUnavailable(f"{name}: server closed the connection")

    async def load_history(self, *args: Any, **kwargs: Any) -> str:
        await self._maybe("history")
        return await self.store.load_history(*args, **kwargs)

    async def load_escalated(self, *args: Any, **kwargs: Any) -> bool:
        await self._maybe("escalation")
        return await self.store.load_escalated(*args, **kwargs)

    async def load_context(self, *args: Any, **kwargs: Any) -> Any:
        await self._maybe("single")
        return await self.store.load_context(*args, **kwargs)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
async def test_a_slow_default_load_degrades_and_says_why(store: Store, mode: str) -> None:
    faulty = Faulty(store, slow="history")
    cfg = mode_config(mode, loads={"history": {"timeout_ms": 50, "policy": "default"}})
    outcomes, _ = await replay(store, cfg, faulty)
    turns = [json.loads(o) for o in outcomes if json.loads(o)["action"] in ("replied",
                                                                            "escalated")]
    assert len(turns) == SAMPLE_ACTIONS["replied"] + SAMPLE_ACTIONS["escalated"]
    assert all(t["degraded"] == {"history": "timeout after 0.05 s"} for t in turns)


async def test_a_failing_required_load_fails_the_turn_and_leaves_it_pending(
    store: Store, conninfo: str,
) -> None:
    faulty = Faulty(store, failing="escalation")
    outcomes, pipeline = await replay(store, mode_config("parallel"), faulty)
    # the sample's 15 conversations: each turn tried 3 times, then left pending
    assert pipeline.metrics.counters["failed turns"] == 15 * 3
    assert not any(json.loads(o)["action"] in ("replied", "escalated", "held")
                   for o in outcomes)
    # the sample stores 89 messages: every one of them is still pending
    assert sql(conninfo, "SELECT status, count(*) FROM inbox GROUP BY status") == [
        ("pending", 89)]
    # every failed turn gave its conversation back, due again after a pause
    assert sql(conninfo, "SELECT count(*) FROM conversations WHERE lease_owner IS NOT NULL"
               " OR lease_until IS NOT NULL") == [(0,)]
    assert sql(conninfo, "SELECT count(*) FROM conversations WHERE attempts > 0"
               " AND last_error LIKE '%load failed on purpose%'") == [(15,)]


async def test_single_statement_failure_falls_back_to_per_load_queries(store: Store) -> None:
    baseline, _ = await replay(store, mode_config("single"))
    sql(store.pool.conninfo, f"TRUNCATE {TABLES} CASCADE")
    fallback, _ = await replay(store, mode_config("single"),
                               Faulty(store, failing="single"))
    assert fallback == baseline


async def test_batched_mode_shares_statements(store: Store) -> None:
    cfg = mode_config("batched", batch_size=16, batch_delay_ms=20)
    sink = OutcomeSink()
    pipeline = Pipeline(cfg, store, sink)
    await pipeline.run(log_source(sample_log()))
    assert pipeline.loader is not None and pipeline.loader.batcher is not None
    sizes = pipeline.loader.batcher.batch_sizes
    assert sum(sizes) == pipeline.metrics.stages["context"].received == 78
    assert max(sizes) > 1 and len(sizes) < 78  # fewer statements than turns
    assert sink.actions == SAMPLE_ACTIONS


async def test_instance_cache_refreshes_in_the_background(store: Store) -> None:
    # real time on purpose: autojump would also jump while the database answers, and
    # time out the refresh query (the trap issue 6 describes)
    from pipeline.engine import instance_rows
    from pipeline.instances import InstanceCache

    await store.seed_instances(instance_rows(make_config()))
    cache = InstanceCache(store, ttl_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert cache.get("demo") is not None and cache.get("new") is None
        sql(store.pool.conninfo, "INSERT INTO instances (name) VALUES ('new')")
        assert cache.get("new") is None  # cached until the next refresh
        with trio.fail_after(10):
            while cache.refreshes < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert cache.get("new") is not None
        cache.close()


async def test_an_outage_makes_turns_wait_and_resume(store: Store, conninfo: str) -> None:
    baseline, _ = await replay(store, mode_config("parallel"))
    sql(conninfo, f"TRUNCATE {TABLES} CASCADE")
    faulty = Faulty(store, outage="escalation", outage_calls=3)
    outcomes, pipeline = await replay(store, mode_config("parallel"), faulty)
    assert outcomes == baseline  # every turn went through once the database answered again
    assert pipeline.metrics.counters["failed turns"] == 0
    assert faulty.outage_calls == 0
