"""The metrics core: per-stage counters, latency histograms and queue-depth gauges.

Stages call :meth:`Metrics.stage` once and keep the :class:`StageMetrics`; recording is a few
integer operations, so it can stay on the hot path. Histograms use logarithmic buckets (2 %
wide) so memory is fixed however long a run lasts. Exposition (a summary table now,
Prometheus later) reads :meth:`Metrics.snapshot` and never touches the stages.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs

_GROWTH = math.log(1.02)
_FLOOR_MS = 0.001


@attrs.define
class Histogram:
    """Latencies in milliseconds, in 2 % buckets; percentiles are accurate to about 1 %."""

    buckets: Counter[int] = attrs.field(factory=Counter)
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def record(self, ms: float) -> None:
        self.count += 1
        self.total += ms
        self.max = max(self.max, ms)
        self.buckets[int(math.log(max(ms, _FLOOR_MS) / _FLOOR_MS) / _GROWTH)] += 1

    def percentile(self, p: float) -> float:
        """The value below which ``p`` percent of the recorded latencies fall."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.max, _FLOOR_MS * math.exp((index + 0.5) * _GROWTH))
        return self.max


@attrs.define
class StageMetrics:
    name: str
    received: int = 0
    sent: int = 0
    errors: int = 0
    dropped: int = 0
    queue_depth: int = 0
    queue_peak: int = 0
    active: int = 0  # conversations with a live lane (keyed stages)
    latency: Histogram = attrs.field(factory=Histogram)
    #: incidents that cost no item, by name (the webhook's "record_dir errors")
    counters: Counter[str] = attrs.field(factory=Counter)
    #: the time an item's own ``timings_ms`` are measured in (None: Trio's clock)
    clock: Callable[[], float] | None = None

    def queued(self, depth: int) -> None:
        self.queue_depth = depth
        self.queue_peak = max(self.queue_peak, depth)


@attrs.define
class Metrics:
    """All stages' metrics, plus free-form counters (actions, escalation reasons, ...)."""

    stages: dict[str, StageMetrics] = attrs.field(factory=dict)
    operations: dict[str, Histogram] = attrs.field(factory=dict)
    counters: Counter[str] = attrs.field(factory=Counter)
    #: the time items' own ``timings_ms`` are measured in (None: Trio's clock). An event-time
    #: replay gives a clock that stands still: stages take no event time, and the outcomes
    #: file stays the same from run to run (real latencies are in the histograms)
    item_clock: Callable[[], float] | None = None

    def stage(self, name: str) -> StageMetrics:
        if name not in self.stages:
            self.stages[name] = StageMetrics(name, clock=self.item_clock)
        return self.stages[name]

    def tally(self, name: str) -> Callable[[int], None]:
        """A callback that counts one ``name`` per call (a batch that left; its size is
        not counted)."""
        def count(size: int) -> None:
            self.counters[name] += 1
        return count

    def operation(self, name: str) -> Histogram:
        """Latency of a named operation inside a stage (a query, a responder call...)."""
        if name not in self.operations:
            self.operations[name] = Histogram()
        return self.operations[name]

    def snapshot(self) -> dict[str, Any]:
        return {
            "stages": {
                s.name: {
                    "in": s.received, "out": s.sent, "errors": s.errors, "dropped": s.dropped,
                    "queue_peak": s.queue_peak, "p50_ms": s.latency.percentile(50),
                    "p95_ms": s.latency.percentile(95), "p99_ms": s.latency.percentile(99),
                    **({"counters": dict(sorted(s.counters.items()))} if s.counters else {}),
                }
                for s in self.stages.values()
            },
            "operations": {
                name: {"count": h.count, "p50_ms": h.percentile(50), "p99_ms": h.percentile(99)}
                for name, h in sorted(self.operations.items())
            },
            "counters": dict(sorted(self.counters.items())),
        }


def summary_table(metrics: Metrics, elapsed_s: float) -> str:
    """A fixed-width table of every stage: counts, peak queue, latency percentiles."""
    head = (f"{'stage':<12}{'in':>8}{'out':>8}{'err':>6}{'drop':>6}{'qpeak':>7}"
            f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    lines = [head, "-" * len(head)]
    for s in metrics.stages.values():
        lat = s.latency
        lines.append(
            f"{s.name:<12}{s.received:>8}{s.sent:>8}{s.errors:>6}{s.dropped:>6}"
            f"{s.queue_peak:>7}{lat.percentile(50):>9.2f}{lat.percentile(95):>9.2f}"
            f"{lat.percentile(99):>9.2f}"
        )
    first = next(iter(metrics.stages.values()), None)
    if first is not None and elapsed_s > 0:
        lines.append(f"throughput: {first.received / elapsed_s:,.0f} events/s "
                     f"over {elapsed_s:.2f} s")
    for s in metrics.stages.values():
        if s.counters:
            counts = ", ".join(f"{name}={n}" for name, n in sorted(s.counters.items()))
            lines.append(f"{s.name}: {counts}")
    return "\n".join(lines)
