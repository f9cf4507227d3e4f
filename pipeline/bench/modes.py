"""One run of the whole pipeline in one context mode, on a fresh database, and its figures."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import trio

from pipeline.bench.measure import CpuMeter, Monitor, cpu_ms_per_msg, warm_up
from pipeline.bench.server import Route, fresh_database, run_dbname
from pipeline.bench.settings import STAGES, Settings, bench_config
from pipeline.bench.tracking import BenchStore, TimedSink, Tracker, TurnMirror, make_source
from pipeline.bench.workload import BenchEvent
from pipeline.db import open_pool
from pipeline.engine import Pipeline
from pipeline.metrics import Histogram, Metrics
from pipeline.rules import burst_rules
from pipeline.store import Store
from stages.outcomes import OutcomeSink

LOUD_EVENTS = 5000  # longer runs report their progress (and RSS) at every tenth


async def run_mode(settings: Settings, route: Route, mode: str, rep: int,
                   events: Iterable[BenchEvent], total_events: int) -> dict[str, Any]:
    """One mode on a fresh database: the whole pipeline, the workload, the figures."""
    cfg = bench_config(settings, mode)
    async with fresh_database(route.server, run_dbname(mode, rep)) as name, \
            open_pool(route.conninfo(name), settings.pool_size) as pool:
        await warm_up(pool)
        store = BenchStore(pool, cfg.database.query_timeout_s)
        tracker = Tracker(TurnMirror(burst_rules(cfg)))
        sink, metrics = TimedSink(tracker=tracker), Metrics()
        monitor = Monitor(total_events, loud=settings.soak or total_events >= LOUD_EVENTS)
        # a finite run decides turns on the workload's recorded time (pipeline.claims.Watermark)
        pipeline = Pipeline(cfg, store, sink, metrics, poll_s=None, finite=True)
        sink.pipeline = pipeline
        meter = CpuMeter(route)
        cpu_before, start = meter.sample(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run, metrics, tracker)
            await pipeline.run(make_source(events, tracker))
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        figures = _mode_figures(tracker, sink, metrics, monitor, pipeline, elapsed, store,
                                pending=await _pending(store))
        figures["cpu_ms_per_msg"] = cpu_ms_per_msg(cpu_before, meter.sample(), total_events)
        # intake no longer waits for the turn stages: the rest of the run drains the inbox
        figures["source_done_s"] = tracker.source_ended_at - start
        return figures


async def _pending(store: Store) -> int:
    """Inbox rows left unprocessed: each is a message the run failed to finish (checked on
    the side, so it does not count as one of the run's round trips)."""
    async with store.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM inbox WHERE status = 'pending'")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


def _mode_figures(tracker: Tracker, sink: OutcomeSink, metrics: Metrics, monitor: Monitor,
                  pipeline: Pipeline, elapsed: float, store: BenchStore,
                  pending: int) -> dict[str, Any]:
    stages = {name: _percentiles(metrics.stages[name].latency)
              for name in STAGES if name in metrics.stages}
    stage_errors = sum(s.errors for s in metrics.stages.values())
    missing = tracker.events - sink.total
    batcher = pipeline.loader.batcher if pipeline.loader else None
    pool = store.pool.stats
    return {
        "msgs_per_s": tracker.events / elapsed,
        "context_p50_ms": stages.get("context", {}).get("p50_ms", 0.0),
        "claim_to_commit_p50_ms": store.claim_to_commit.percentile(50),
        "claim_to_commit_p99_ms": store.claim_to_commit.percentile(99),
        "e2e_p50_ms": tracker.e2e.percentile(50), "e2e_p95_ms": tracker.e2e.percentile(95),
        "e2e_p99_ms": tracker.e2e.percentile(99),
        "e2e_with_burst_p50_ms": tracker.e2e_with_burst.percentile(50),
        "e2e_with_burst_p99_ms": tracker.e2e_with_burst.percentile(99),
        "service_p50_ms": tracker.service.percentile(50),
        "service_p99_ms": tracker.service.percentile(99),
        "round_trips_per_msg": store.round_trips / tracker.events,
        "claims_per_msg": store.claims / tracker.events,
        "peak_connections": pool.peak_in_use, "pool_size": pool.size,
        "peak_rss_mb": monitor.peak_rss_mb,
        "errors": stage_errors + missing + tracker.unmatched + pending,
        "failed_turns": metrics.counters["failed turns"], "stage_errors": stage_errors,
        "missing_outcomes": missing, "unmatched_outcomes": tracker.unmatched,
        "pending_in_inbox": pending, "degraded_turns": tracker.degraded,
        "messages": tracker.events, "outcomes": sink.total, "elapsed_s": elapsed,
        "round_trips": store.round_trips, "claims": store.claims, "turns": tracker.turns,
        "failed_claims": metrics.counters["claims lost"],
        "peak_active_conversations": monitor.peak_active,
        "mean_batch": statistics.fmean(batcher.batch_sizes) if batcher and
        batcher.batch_sizes else None,
        "stages": stages, "actions": dict(sorted(sink.actions.items())),
        "rss_timeline": monitor.timeline, "rss_growth_mb": _growth(monitor.timeline),
    }


def _growth(timeline: list[dict[str, float]]) -> float:
    """RSS growth from the first fifth of a run (warmed up) to its end."""
    if len(timeline) < 3:
        return 0.0
    return round(timeline[-1]["rss_mb"] - timeline[1]["rss_mb"], 1)


def _percentiles(h: Histogram) -> dict[str, float]:
    return {"count": h.count, "p50_ms": h.percentile(50), "p95_ms": h.percentile(95),
            "p99_ms": h.percentile(99)}
