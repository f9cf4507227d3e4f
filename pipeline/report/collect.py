"""What a run gathers for the report, with memory bounded however long the run.

:class:`ReportCollector` counts each outcome into a time bucket per action as it comes (at most
``max_buckets`` of them: when the run outgrows them, the width steps up and neighbours are
merged exactly) and counts escalation reasons per instance. :meth:`ReportCollector.finish`
adds the run's :class:`Metrics`, :class:`OutcomeSink` and summary numbers, picks a display
bucket width from the run's time span (aiming at 60-120 buckets) and returns the frozen
:class:`ReportData` that the page is drawn from.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from collections.abc import Iterable

import attrs

from pipeline.metrics import Histogram, Metrics
from stages.outcomes import OutcomeSink
from stages.records import ACTIONS, Outcome

_TURN_ACTIONS = ("replied", "escalated", "held")

# Internal bucket widths (ms), each a multiple of the one before, so that stepping up merges
# neighbouring buckets exactly; beyond the last one, the width doubles.
_CHAIN_MS = (1, 10, 100, 1_000, 10_000, 60_000, 600_000, 3_600_000, 86_400_000)
# Display widths (ms) people read easily; one that is a multiple of the internal width is used.
_NICE_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 20_000,
            30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_200_000, 1_800_000,
            3_600_000, 7_200_000, 10_800_000, 21_600_000, 43_200_000, 86_400_000,
            172_800_000, 604_800_000)
_TARGET_BUCKETS = (60, 120)
_PER_BUCKET = 4  # fewer outcomes than this per bucket on average: fewer, wider buckets


@attrs.frozen
class StageLatency:
    """Latency of one stage (or operation): counts, percentiles and its histogram.

    ``buckets`` are ``(low_ms, high_ms, count)`` in ascending order, straight from the
    stage's 2 % histogram buckets (a few hundred at most).
    """

    name: str
    count: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    received: int = 0
    sent: int = 0
    errors: int = 0
    dropped: int = 0
    queue_peak: int = 0
    buckets: tuple[tuple[float, float, int], ...] = ()

    @classmethod
    def from_histogram(cls, name: str, hist: Histogram, **counts: int) -> StageLatency:
        growth = math.log(1.02)  # pipeline.metrics: 2 % buckets above 1 µs
        buckets = tuple(
            (0.001 * math.exp(i * growth), 0.001 * math.exp((i + 1) * growth), n)
            for i, n in sorted(hist.buckets.items()) if n > 0
        )
        return cls(name, hist.count, hist.percentile(50), hist.percentile(95),
                   hist.percentile(99), hist.max, hist.total / hist.count if hist.count else 0.0,
                   buckets=buckets, **counts)


@attrs.frozen
class InstanceCounts:
    """Outcomes of one instance, per action."""

    name: str
    actions: tuple[tuple[str, int], ...]

    def get(self, action: str) -> int:
        return dict(self.actions).get(action, 0)

    @property
    def turns(self) -> int:
        """Turns answered or handed over: replied + escalated + held."""
        return sum(self.get(a) for a in _TURN_ACTIONS)


@attrs.frozen
class ReasonCount:
    """One escalation reason: how often, and how often per instance (most first)."""

    reason: str
    count: int
    instances: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class Timeline:
    """Outcomes per time bucket and action: bucket ``i`` is ``[i, i+1) * bucket_s`` after
    the start. ``started_at``, when known, is the recorded (wall-clock) time of the start;
    without it the axis counts from zero."""

    bucket_s: float = 1.0
    counts: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (action, per bucket), ACTIONS order
    started_at: dt.datetime | None = None

    @property
    def buckets(self) -> int:
        return max((len(c) for _, c in self.counts), default=0)

    def totals(self) -> list[int]:
        """Outcomes of every action, per bucket."""
        out = [0] * self.buckets
        for _, series in self.counts:
            for i, n in enumerate(series):
                out[i] += n
        return out


@attrs.frozen
class ReportData:
    """Everything the page shows; build it with :class:`ReportCollector`."""

    title: str = "Replay report"
    sources: tuple[str, ...] = ()  # the replayed log files
    clock: str = "event"
    events: int = 0
    outcomes: int = 0
    virtual_s: float = 0.0  # the run's span on the replay clock
    real_s: float = 0.0  # wall-clock time the replay took
    round_trips: int = 0
    failed_turns: int = 0
    actions: tuple[tuple[str, int], ...] = ()  # every action in ACTIONS order, zeros included
    instances: tuple[InstanceCounts, ...] = ()
    reasons: tuple[ReasonCount, ...] = ()  # most frequent first
    invalid: tuple[str, ...] = ()  # "file:line: reason", the first few
    stages: tuple[StageLatency, ...] = ()  # pipeline order
    operations: tuple[StageLatency, ...] = ()  # queries and calls inside the stages
    timeline: Timeline = attrs.field(factory=Timeline)
    generated: str = ""  # e.g. when and by what the report was made; shown in the footer

    def action(self, name: str) -> int:
        return dict(self.actions).get(name, 0)


class ReportCollector:
    """Counts outcomes into time buckets as they come; :meth:`finish` makes the ReportData.

    ``start`` is the time (seconds) the run started at (default: the first outcome's);
    ``started_at`` the recorded time that corresponds to it (e.g. the first event's
    ``received_at``), so that the time axis shows recorded clock times.
    """

    def __init__(self, *, start: float | None = None, started_at: dt.datetime | None = None,
                 max_buckets: int = 4000) -> None:
        if max_buckets < 10:
            raise ValueError(f"max_buckets must be >= 10, not {max_buckets}")
        self.start = start
        self.started_at = started_at
        self.max_buckets = max_buckets
        self.width_ms = _CHAIN_MS[0]
        self.buckets: dict[int, list[int]] = {}
        self.last = 0.0  # latest offset seen, in seconds after start
        self.reasons: Counter[tuple[str, str]] = Counter()
        self.recorded = 0
        self._index = {a: i for i, a in enumerate(ACTIONS)}

    def record(self, outcome: Outcome, at: float) -> None:
        """Count ``outcome``, at time ``at`` (seconds)."""
        if self.start is None:
            self.start = at
        offset = max(0.0, at - self.start)
        self.last = max(self.last, offset)
        index = int(offset * 1000 // self.width_ms)
        while index >= self.max_buckets:
            self._widen()
            index = int(offset * 1000 // self.width_ms)
        row = self.buckets.get(index)
        if row is None:
            row = self.buckets[index] = [0] * len(ACTIONS)
        row[self._index[outcome.action]] += 1
        self.recorded += 1
        if outcome.action == "escalated":
            self.reasons[(outcome.instance or "", outcome.reason or "(no reason)")] += 1

    def _widen(self) -> None:
        width = self.width_ms
        wider = next((w for w in _CHAIN_MS if w > width), width * 2)
        factor = wider // width
        merged: dict[int, list[int]] = {}
        for index, row in self.buckets.items():
            into = merged.setdefault(index // factor, [0] * len(ACTIONS))
            for i, n in enumerate(row):
                into[i] += n
        self.buckets, self.width_ms = merged, wider

    def timeline(self, span_s: float | None = None) -> Timeline:
        """The counts re-bucketed to a readable width over ``span_s`` (default: the run's)."""
        span_ms = max(self.last, span_s or 0.0) * 1000
        width = _display_width(span_ms, self.width_ms, self.recorded)
        n = max(1, math.ceil(span_ms / width)) if span_ms > 0 else 1
        if self.buckets:
            # the last outcome may sit exactly on the far edge
            n = max(n, max(self.buckets) * self.width_ms // width + 1)
        factor = width // self.width_ms
        series = [[0] * n for _ in ACTIONS]
        for index, row in self.buckets.items():
            for a, count in enumerate(row):
                series[a][index // factor] += count
        return Timeline(width / 1000, tuple((a, tuple(s)) for a, s in zip(ACTIONS, series,
                                                                            strict=True)),
                        self.started_at)

    def finish(self, metrics: Metrics, sink: OutcomeSink, *, events: int, real_s: float,
               round_trips: int = 0, virtual_s: float | None = None,
               sources: Iterable[str] = (), title: str = "Replay report",
               clock: str = "event", generated: str = "") -> ReportData:
        """The report of a finished run: ``metrics`` and ``sink`` as the run left them."""
        span = self.last if virtual_s is None else max(virtual_s, 0.0)
        instance_names = sorted({i for i, _ in sink.per_instance})
        instances = tuple(
            InstanceCounts(name, tuple((a, sink.per_instance[(name, a)]) for a in ACTIONS
                                       if sink.per_instance[(name, a)]))
            for name in instance_names
        )
        by_reason: dict[str, Counter[str]] = {}
        for (inst, reason), n in self.reasons.items():
            by_reason.setdefault(reason, Counter())[inst] += n
        reasons = []
        for reason, total in sorted(sink.escalations.items(), key=lambda kv: (-kv[1], kv[0])):
            per = by_reason.get(reason, Counter())
            reasons.append(ReasonCount(reason, total, tuple(
                sorted(((i or "?", n) for i, n in per.items()), key=lambda kv: (-kv[1], kv[0])))))
        stages = tuple(
            StageLatency.from_histogram(s.name, s.latency, received=s.received, sent=s.sent,
                                        errors=s.errors, dropped=s.dropped,
                                        queue_peak=s.queue_peak)
            for s in metrics.stages.values()
        )
        operations = tuple(StageLatency.from_histogram(name, h, received=h.count, sent=h.count)
                           for name, h in sorted(metrics.operations.items()))
        return ReportData(
            title=title, sources=tuple(sources), clock=clock, events=events,
            outcomes=sink.total, virtual_s=span, real_s=real_s, round_trips=round_trips,
            failed_turns=metrics.counters["failed turns"],
            actions=tuple((a, sink.actions[a]) for a in ACTIONS),
            instances=instances, reasons=tuple(reasons), invalid=tuple(sink.invalid),
            stages=stages, operations=operations, timeline=self.timeline(span),
            generated=generated,
        )


def _display_width(span_ms: float, unit_ms: int, outcomes: int) -> int:
    """A readable bucket width (ms), a multiple of ``unit_ms``, giving ~60-120 buckets --
    fewer for a run of few outcomes, which would otherwise be a barcode of ones and zeros."""
    candidates = [w for w in _NICE_MS if w % unit_ms == 0]
    candidates += [unit_ms * k for k in (1, 2, 5, 10, 20, 50, 100)]
    if span_ms <= 0:
        return max(unit_ms, 1000) if 1000 % unit_ms == 0 or unit_ms > 1000 else unit_ms
    low, high = _TARGET_BUCKETS
    if outcomes < high * _PER_BUCKET:
        high = max(12, outcomes // _PER_BUCKET)
        low = high // 2
    middle = math.sqrt(low * high)

    def score(width: int) -> tuple[float, float]:
        n = max(1, math.ceil(span_ms / width))
        outside = math.log(low / n) if n < low else math.log(n / high) if n > high else 0.0
        return (outside, abs(math.log(n / middle)))

    return min(sorted(set(candidates)), key=score)

