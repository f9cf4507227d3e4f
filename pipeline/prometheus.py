"""``GET /metrics`` in the Prometheus text format, and the readiness check of ``/readyz``.

Nothing is counted twice: at each scrape a collector reads what the process keeps anyway --
outcome counts per instance and action, the per-stage histograms and queue gauges, the turn
durations, the claim counters, the database pool -- and one statement adds the database's
figures (outbox rows by status, dead letters, pending inbox rows). Our histograms have 2 %
buckets; they are summed into Prometheus' cumulative buckets at scrape time (accurate to
those 2 %). Turn buckets reach ten minutes: an AI turn can take that long.

Labels are low-cardinality by construction: instance, action, stage, status -- never a
sender, a message id or a text.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from pipeline.db import DatabaseError, PoolStats
from pipeline.metrics import Histogram, Metrics
from pipeline.migrate import available
from stages.outcomes import OutcomeSink

__all__ = ["CONTENT_TYPE", "Exporter", "cumulative", "problems"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
TURN_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                  600.0)
#: Metrics counters exported as ``pipeline_<name>_total``
COUNTERS = {"claims": "conversations claimed", "claims lost": "commits refused: lease lost",
            "leases lost": "leases found taken over at renewal",
            "lease expiries": "conversations claimed after their lease expired (a process "
                              "died or stalled)",
            "failed turns": "turns that failed and were given back",
            "lease renewals": "lease renewal statements",
            "commit batches": "batches of turn commits written together (group commit: "
                              "fewer than turns when turns end at the same time)",
            "inbox write batches": "batches of webhook bodies stored together (concurrent "
                                   "requests share a statement)"}


def cumulative(histogram: Histogram, bounds_s: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` in seconds, cumulative counts, ``+Inf`` last) of one of
    our millisecond histograms; a 2 % bucket counts under a bound when its middle does."""
    counts = []
    for bound in bounds_s:
        limit = bound * 1000
        counts.append((_le(bound), float(sum(
            n for index, n in histogram.buckets.items() if _middle_ms(index) <= limit))))
    counts.append(("+Inf", float(histogram.count)))
    return counts


def _middle_ms(index: int) -> float:
    return 0.001 * math.exp((index + 0.5) * math.log(1.02))


def _le(bound: float) -> str:
    return repr(float(bound))


@attrs.define(eq=False)  # hashable: the registry keys its collectors
class _Collector(Collector):
    exporter: Exporter
    database: Mapping[str, Any] | None

    def collect(self) -> Iterable[Metric]:
        yield from self._messages()
        yield from self._stages()
        yield from self._work()
        yield from self._database()

    def _messages(self) -> Iterator[Metric]:
        sink = self.exporter.sink
        family = CounterMetricFamily("pipeline_messages", "outcomes of inbound messages "
                                     "(and events), by instance and action",
                                     labels=["instance", "action"])
        named: dict[str, int] = {}
        for (instance, action), n in sorted(sink.per_instance.items()):
            family.add_metric([instance, action], n)
            named[action] = named.get(action, 0) + n
        for action, n in sorted(sink.actions.items()):  # no instance: invalid, unknown
            if n - named.get(action, 0):
                family.add_metric(["", action], n - named.get(action, 0))
        yield family
        receipts = CounterMetricFamily("pipeline_receipts", "status webhooks of our sends, by "
                                       "instance and status (failed: WhatsApp refused it)",
                                       labels=["instance", "status"])
        for (instance, status), n in sorted(sink.receipts.items()):
            receipts.add_metric([instance, status], n)
        yield receipts

    def _stages(self) -> Iterator[Metric]:
        metrics = self.exporter.metrics
        latency = HistogramMetricFamily("pipeline_stage_seconds", "time a stage spent on an "
                                        "item", labels=["stage"])
        depth = GaugeMetricFamily("pipeline_stage_queue_depth", "items waiting for a stage",
                                  labels=["stage"])
        errors = CounterMetricFamily("pipeline_stage_errors", "items a stage failed on",
                                     labels=["stage"])
        for name, stage in sorted(metrics.stages.items()):
            latency.add_metric([name], cumulative(stage.latency, STAGE_BUCKETS_S),
                               stage.latency.total / 1000)
            depth.add_metric([name], stage.queue_depth)
            errors.add_metric([name], stage.errors)
        yield from (latency, depth, errors)
        turn = metrics.operations.get("turn", Histogram())
        turns = HistogramMetricFamily("pipeline_turn_seconds", "from a turn's claim to its "
                                      "commit")
        turns.add_metric([], cumulative(turn, TURN_BUCKETS_S), turn.total / 1000)
        yield turns

    def _work(self) -> Iterator[Metric]:
        counters = self.exporter.metrics.counters
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"pipeline_{name.replace(' ', '_')}", doc,
                                      value=counters.get(name, 0))
        pool = self.exporter.pool
        if pool is not None:
            yield GaugeMetricFamily("pipeline_db_pool_in_use", "database connections in use",
                                    value=pool.in_use)
            yield GaugeMetricFamily("pipeline_db_pool_size", "database connections at most",
                                    value=pool.size)

    def _database(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pipeline_database_up", "1 when the scrape's query answered",
                               value=1 if self.database is not None else 0)
        yield up
        if self.database is None:
            return
        outbox = GaugeMetricFamily("pipeline_outbox_rows", "outbox rows by status",
                                   labels=["status"])
        for status in ("pending", "delivered", "dead"):
            outbox.add_metric([status], self.database["outbox"].get(status, 0))
        yield outbox
        yield GaugeMetricFamily("pipeline_dead_letters", "dead letters kept",
                                value=self.database["dead_letters"])
        yield GaugeMetricFamily("pipeline_inbox_pending", "inbox rows waiting for a turn",
                                value=self.database["inbox_pending"])


@attrs.define
class Exporter:
    """What ``/metrics`` reads; ``figures`` is the database's part (one statement)."""

    metrics: Metrics
    sink: OutcomeSink
    figures: Callable[[], Awaitable[Mapping[str, Any]]]
    pool: PoolStats | None = None

    async def page(self) -> bytes:
        try:
            database: Mapping[str, Any] | None = await self.figures()
        except DatabaseError:
            database = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, database))
        return generate_latest(registry)


async def problems(ping: Callable[[], Awaitable[None]],
                   applied: Callable[[], Awaitable[list[str]]],
                   stopping: Callable[[], bool]) -> list[str]:
    """Why this process is not ready for traffic (empty: ready): the database does not
    answer, its migrations are not current, or the process is shutting down."""
    if stopping():
        return ["shutting down"]
    try:
        await ping()
        versions = set(await applied())
    except DatabaseError as exc:
        return [f"database: {exc}"]
    missing = [m.name for m in available() if m.version not in versions]
    return [f"migrations not applied: {', '.join(missing)}"] if missing else []
