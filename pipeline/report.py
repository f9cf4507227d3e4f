"""``pipeline replay --report FILE.html``: one self-contained page of charts about a replay.

The page needs no network at all: inline CSS, inline SVG drawn here in Python, no scripts, and
a Content-Security-Policy that forbids every fetch. Tooltips are SVG ``<title>`` elements.
Every string that comes from the data (instance names, reasons, file names) is escaped.

Feeding it, with memory bounded however long the run:

* :class:`ReportCollector` -- :meth:`~ReportCollector.record` each outcome with the recorded
  time it was produced; outcomes are counted into time buckets per action (at most
  ``max_buckets`` of them: when the run outgrows them, the width steps up and neighbours are
  merged exactly), and escalation reasons are counted per instance.
* :meth:`~ReportCollector.finish` -- with the run's :class:`Metrics`, :class:`OutcomeSink` and
  summary numbers, picks a display bucket width from the run's time span (aiming at 60-120
  buckets) and returns the frozen :class:`ReportData`.
* :func:`render_report` -- ``ReportData`` → the HTML page (deterministic: same data, same
  bytes).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import attrs

from pipeline.metrics import Histogram, Metrics
from stages.outcomes import OutcomeSink
from stages.records import ACTIONS, Outcome

__all__ = ["ACTION_COLOURS", "InstanceCounts", "ReasonCount", "ReportCollector", "ReportData",
           "StageLatency", "Timeline", "render_report"]

#: one colour per action, used by every chart and legend of the page
ACTION_COLOURS: dict[str, str] = {
    "replied": "#2f9e44",
    "escalated": "#f76707",
    "held": "#9c36b5",
    "merged": "#74c0fc",
    "duplicate": "#868e96",
    "invalid": "#e03131",
    "ignored": "#ced4da",
}
_PCT_COLOURS = {"p50": "#a5d8ff", "p95": "#4dabf7", "p99": "#1864ab"}
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
_TIME_LEFT = 104  # left edge of the time axis, the same in both time charts


# --------------------------------------------------------------------------------- the data


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


# ---------------------------------------------------------------------------- the collector


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


def _display_width(span_ms: float, unit_ms: int, outcomes: int | None = None) -> int:
    """A readable bucket width (ms), a multiple of ``unit_ms``, giving ~60-120 buckets --
    fewer for a run of few outcomes, which would otherwise be a barcode of ones and zeros."""
    candidates = [w for w in _NICE_MS if w % unit_ms == 0]
    candidates += [unit_ms * k for k in (1, 2, 5, 10, 20, 50, 100)]
    if span_ms <= 0:
        return max(unit_ms, 1000) if 1000 % unit_ms == 0 or unit_ms > 1000 else unit_ms
    low, high = _TARGET_BUCKETS
    if outcomes is not None and outcomes < high * _PER_BUCKET:
        high = max(12, outcomes // _PER_BUCKET)
        low = high // 2
    middle = math.sqrt(low * high)

    def score(width: int) -> tuple[float, float]:
        n = max(1, math.ceil(span_ms / width))
        outside = math.log(low / n) if n < low else math.log(n / high) if n > high else 0.0
        return (outside, abs(math.log(n / middle)))

    return min(sorted(set(candidates)), key=score)


# ------------------------------------------------------------------------------ formatting


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "…"


def _text_px(text: str, size: float = 12, bold: bool = False) -> float:
    """A generous estimate of a label's width (DejaVu/Helvetica-like fonts)."""
    return len(text) * size * (0.68 if bold else 0.62)


def _num(n: float) -> str:
    return f"{n:,.0f}" if abs(n) >= 100 or float(n).is_integer() else f"{n:,.1f}"


def _ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 0.1:
        return f"{ms:.2f} ms"
    if ms <= 0:
        return "0 ms"
    return f"{ms * 1000:.0f} µs"


def _tick_ms(ms: float) -> str:
    """An axis label for a round number of milliseconds: 10 µs, 0.5 ms, 20 ms, 1 s."""
    if ms <= 0:
        return "0"
    for unit, size in (("s", 1000.0), ("ms", 1.0), ("µs", 0.001)):
        if ms >= size * 0.999:
            return f"{ms / size:.4g} {unit}"
    return f"{ms * 1000:.3g} µs"


def _duration(s: float) -> str:
    if s < 0.001:
        return "0 s"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec} s" if sec else f"{m} min"
    if s < 2 * 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"


def _rate(n: float, s: float) -> str:
    if s <= 0:
        return "–"
    per_s = n / s
    if per_s >= 1:
        return f"{per_s:,.0f}/s" if per_s >= 100 else f"{per_s:,.1f}/s"
    return f"{per_s * 60:,.1f}/min"


def _f(x: float) -> str:
    """An SVG coordinate."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _nice_step(span: float, ticks: int, integer: bool = False) -> float:
    raw = span / max(ticks, 1)
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10) if integer and power < 10 else (1, 2, 2.5, 5, 10):
        if raw <= m * power:
            return m * power
    return 10 * power


def _linear_ticks(top: float, ticks: int = 5,
                  integer: bool = False) -> tuple[float, list[float]]:
    """A rounded axis maximum >= ``top`` and the ticks from 0 to it (whole numbers for
    counts)."""
    if top <= 0:
        return 1.0, [0.0, 1.0]
    step = _nice_step(top, ticks, integer)
    if (integer or top >= 1) and step < 1:
        step = 1.0
    end = math.ceil(top / step - 1e-9) * step
    count = round(end / step)
    return end, [i * step for i in range(count + 1)]


# ------------------------------------------------------------------------------------ SVG


class _Svg:
    def __init__(self, ident: str, width: float, height: float, title: str) -> None:
        self.parts = [f'<svg id="{ident}" class="chart" viewBox="0 0 {_f(width)} {_f(height)}" '
                      f'width="{_f(width)}" height="{_f(height)}" role="img" '
                      f'aria-labelledby="{ident}-title">',
                      f'<title id="{ident}-title">{_e(title)}</title>']

    def add(self, part: str) -> None:
        self.parts.append(part)

    def text(self, x: float, y: float, label: str, cls: str = "", anchor: str = "start",
             extra: str = "") -> None:
        c = f' class="{cls}"' if cls else ""
        a = f' text-anchor="{anchor}"' if anchor != "start" else ""
        self.parts.append(f'<text x="{_f(x)}" y="{_f(y)}"{c}{a}{extra}>{_e(label)}</text>')

    def line(self, x1: float, y1: float, x2: float, y2: float, cls: str) -> None:
        self.parts.append(f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" '
                          f'class="{cls}"/>')

    def rect(self, x: float, y: float, w: float, h: float, fill: str = "",
             tip: str = "", cls: str = "") -> None:
        f = f' fill="{fill}"' if fill else ""
        c = f' class="{cls}"' if cls else ""
        body = f"<title>{_e(tip)}</title></rect>" if tip else "/>"
        end = ">" + body if tip else body
        self.parts.append(f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(max(w, 0))}" '
                          f'height="{_f(max(h, 0))}"{f}{c}{end}')

    def done(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def _empty_chart(ident: str, title: str, width: float, height: float, message: str) -> str:
    svg = _Svg(ident, width, height, title)
    svg.rect(0.5, 0.5, width - 1, height - 1, cls="empty-frame")
    svg.text(width / 2, height / 2 + 4, message, "empty", "middle")
    return svg.done()


class _LogScale:
    def __init__(self, low: float, high: float, x0: float, x1: float) -> None:
        self.lo = math.floor(math.log10(max(low, 1e-6)))
        self.hi = max(math.ceil(math.log10(max(high, 1e-6))), self.lo + 1)
        self.x0, self.x1 = x0, x1

    def __call__(self, v: float) -> float:
        lv = math.log10(max(v, 10.0 ** self.lo))
        return self.x0 + (lv - self.lo) / (self.hi - self.lo) * (self.x1 - self.x0)

    def ticks(self) -> list[tuple[float, bool]]:
        """(value, major) pairs: decades, and 2 and 5 when there are few decades."""
        out: list[tuple[float, bool]] = []
        minors = (2, 5) if self.hi - self.lo <= 3 else ()
        for d in range(self.lo, self.hi + 1):
            out.append((10.0 ** d, True))
            if d < self.hi:
                out += [(m * 10.0 ** d, False) for m in minors]
        return out


# ------------------------------------------------------------------------------ the charts


def _latency_chart(stages: Sequence[StageLatency], width: float = 536) -> str:
    ident, title = "latency-chart", "Latency per stage: p50, p95, p99"
    shown = [s for s in stages if s.count]
    if not shown:
        return _empty_chart(ident, title, width, 200, "no latencies recorded")
    label_w = max(60.0, min(150.0, max(_text_px(_clip(s.name, 20), 12.5, True)
                                       for s in shown) + 14))
    left, right, top, row = label_w, width - 64, 34, 46
    height = top + row * len(shown) + 44
    values = [v for s in shown for v in (s.p50_ms, s.p95_ms, s.p99_ms)]
    positive = [v for v in values if v > 0] or [0.001]
    use_log = max(values) / min(positive) > 30
    svg = _Svg(ident, width, height, title + (" (log scale)" if use_log else ""))
    # legend
    x = left
    for name, colour in _PCT_COLOURS.items():
        svg.rect(x, 8, 12, 12, colour)
        svg.text(x + 17, 18, name, "legend")
        x += 58
    bottom = top + row * len(shown)
    scale: _LogScale | None = None
    end = 1.0
    if use_log:
        scale = _LogScale(min(positive), max(values), left, right)
        ticks = scale.ticks()
        for v, major in ticks:
            gx = scale(v)
            svg.line(gx, top - 4, gx, bottom, "grid" if major else "grid minor")
            if major or len(ticks) <= 12:
                svg.text(gx, bottom + 16, _tick_ms(v), "tick", "middle")
    else:
        end, lin = _linear_ticks(max(values))
        for v in lin:
            gx = left + v / end * (right - left)
            svg.line(gx, top - 4, gx, bottom, "grid")
            svg.text(gx, bottom + 16, _tick_ms(v), "tick", "middle")

    def pos(v: float) -> float:
        if scale is not None:
            return scale(v)
        return left + v / end * (right - left)

    for r, s in enumerate(shown):
        y = top + r * row
        svg.text(left - 10, y + row / 2 + 4, _clip(s.name, 20), "label", "end")
        for k, (name, v) in enumerate((("p50", s.p50_ms), ("p95", s.p95_ms),
                                       ("p99", s.p99_ms))):
            by = y + 6 + k * 11.5
            w = pos(v) - left
            svg.rect(left, by, w, 9, _PCT_COLOURS[name],
                     tip=f"{s.name} {name}: {_ms(v)} ({s.count:,} measured)")
            if k == 2 or v > 0:
                svg.text(left + w + 4, by + 8.5, _ms(v), "value small")
    svg.line(left, top - 4, left, bottom, "axis")
    svg.text((left + right) / 2, height - 6,
             "milliseconds" + (", log scale" if use_log else ""), "axis-title", "middle")
    return svg.done()


def _histograms_chart(stages: Sequence[StageLatency], width: float = 536) -> str:
    ident, title = "latency-histograms", "Latency distribution per stage"
    shown = [s for s in stages if s.count and s.buckets]
    if not shown:
        return _empty_chart(ident, title, width, 200, "no latencies recorded")
    label_w = max(60.0, min(150.0, max(_text_px(_clip(s.name, 20), 12.5, True)
                                       for s in shown) + 14))
    left, right, top, row = label_w, width - 24, 34, 46
    height = top + row * len(shown) + 44
    lo = min(s.buckets[0][0] for s in shown)
    hi = max(s.buckets[-1][1] for s in shown)
    scale = _LogScale(lo, hi, left, right)
    svg = _Svg(ident, width, height, title + " (log scale, shared)")
    x = left
    for name, colour in (("p50", "#495057"), ("p95", _PCT_COLOURS["p95"]),
                         ("p99", _PCT_COLOURS["p99"])):
        svg.add(f'<line x1="{_f(x)}" y1="9" x2="{_f(x)}" y2="21" stroke="{colour}" '
                'stroke-width="2"/>')
        svg.text(x + 6, 19, name, "legend")
        x += 50
    svg.text(right, 19, "bar height: share of the stage's items", "note", "end")
    bottom = top + row * len(shown)
    for v, major in scale.ticks():
        gx = scale(v)
        svg.line(gx, top - 4, gx, bottom, "grid" if major else "grid minor")
        if major or scale.hi - scale.lo <= 2:
            svg.text(gx, bottom + 16, _tick_ms(v), "tick", "middle")
    bins = 110
    span = scale.hi - scale.lo
    for r, s in enumerate(shown):
        y = top + r * row
        counts = [0] * bins
        for low, high, n in s.buckets:
            mid = math.log10(math.sqrt(low * high))
            b = min(bins - 1, max(0, int((mid - scale.lo) / span * bins)))
            counts[b] += n
        peak = max(counts) or 1
        base = y + row - 6
        svg.line(left, base, right, base, "baseline")
        bw = (right - left) / bins
        for b, n in enumerate(counts):
            if not n:
                continue
            h = max(1.5, n / peak * (row - 12))
            a = 10 ** (scale.lo + b / bins * span)
            z = 10 ** (scale.lo + (b + 1) / bins * span)
            svg.rect(left + b * bw + 0.5, base - h, bw - 1, h, "#74c0fc",
                     tip=f"{s.name}: {n:,} between {_ms(a)} and {_ms(z)}")
        for name, v, colour in (("p50", s.p50_ms, "#495057"), ("p95", s.p95_ms,
                                                               _PCT_COLOURS["p95"]),
                                ("p99", s.p99_ms, _PCT_COLOURS["p99"])):
            px = scale(v)
            svg.add(f'<line x1="{_f(px)}" y1="{_f(y + 4)}" x2="{_f(px)}" y2="{_f(base)}" '
                    f'stroke="{colour}" stroke-width="2"><title>{_e(s.name)} {name}: '
                    f'{_e(_ms(v))}</title></line>')
        svg.text(left - 10, y + row / 2 + 4, _clip(s.name, 20), "label", "end")
        svg.text(left - 10, y + row / 2 + 16, f"n={s.count:,}", "note", "end")
    svg.text((left + right) / 2, height - 6, "milliseconds, log scale", "axis-title", "middle")
    return svg.done()


def _time_ticks(data: Timeline, total_s: float, px: float) -> tuple[list[tuple[float, str]], str]:
    """Ticks ``(offset_s, label)`` along ``[0, total_s]`` and the axis title."""
    max_ticks = max(2, int(px / 90))
    steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60,
             120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800]
    step = next((s for s in steps if total_s / s <= max_ticks), steps[-1])
    ticks: list[tuple[float, str]] = []
    started = data.started_at
    if started is not None:
        started = started.astimezone(dt.UTC)
        t0 = started.timestamp()
        first = math.ceil(t0 / step - 1e-9) * step
        k = 0
        while (at := first + k * step) <= t0 + total_s + 1e-9:
            when = dt.datetime.fromtimestamp(at, dt.UTC)
            if step >= 86400:
                label = when.strftime("%b %d")
            elif step >= 60:
                label = when.strftime("%H:%M")
            elif step >= 1:
                label = when.strftime("%H:%M:%S")
            else:
                label = when.strftime("%S.") + f"{when.microsecond // 1000:03d}"
            ticks.append((at - t0, label))
            k += 1
        end = started + dt.timedelta(seconds=total_s)
        days = started.strftime("%Y-%m-%d")
        if end.date() != started.date():
            days += " – " + end.strftime("%Y-%m-%d")
        return ticks, f"recorded time (UTC, {days})"
    k = 0
    while (at := k * step) <= total_s + 1e-9:
        if step >= 60:
            h, m = divmod(round(at / 60), 60)
            label = f"{h}:{m:02d}"
        elif step >= 1:
            m, sec = divmod(round(at), 60)
            label = f"{m}:{sec:02d}"
        else:
            label = f"{at:.3g}"
        ticks.append((at, label))
        k += 1
    unit = "h:mm" if step >= 60 else "m:ss" if step >= 1 else "s"
    return ticks, f"time since the start of the replay ({unit})"


def _bucket_label(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    if seconds < 86400:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 86400:g} d"


def _when(data: Timeline, offset: float) -> str:
    if data.started_at is not None:
        t = data.started_at.astimezone(dt.UTC) + dt.timedelta(seconds=offset)
        return t.strftime("%H:%M:%S") if data.bucket_s >= 1 else t.strftime("%H:%M:%S.%f")[:-3]
    return f"+{_duration(offset)}" if offset else "+0 s"


def _throughput_chart(data: Timeline, width: float = 1130) -> str:
    ident = "throughput-chart"
    per = _bucket_label(data.bucket_s)
    title = f"Outcomes over time, per {per}, stacked by action"
    totals = data.totals()
    if not totals or not sum(totals):
        return _empty_chart(ident, title, width, 260, "no outcomes")
    left, right = _TIME_LEFT, width - 16
    # the legend on top, wrapped to the chart's width
    legend: list[tuple[float, float, str, int]] = []
    x, y = float(left), 12.0
    for action, series in data.counts:
        label = f"{action} {sum(series):,}"
        item = 17 + _text_px(label, 12)
        if x > left and x + item > right:
            x, y = float(left), y + 20
        legend.append((x, y, action, sum(series)))
        x += item + 18
    top = y + 28
    height = top + 244 + 46
    bottom = height - 46
    n = len(totals)
    total_s = n * data.bucket_s
    y_end, y_ticks = _linear_ticks(max(totals), integer=True)
    svg = _Svg(ident, width, height, title)

    def ypos(v: float) -> float:
        return bottom - v / y_end * (bottom - top)

    for v in y_ticks:
        svg.line(left, ypos(v), right, ypos(v), "grid")
        svg.text(left - 8, ypos(v) + 4, _num(v), "tick", "end")
    ticks, axis_title = _time_ticks(data, total_s, right - left)
    for offset, label in ticks:
        gx = left + offset / total_s * (right - left)
        svg.line(gx, bottom, gx, bottom + 5, "axis")
        svg.text(gx, bottom + 18, label, "tick", "middle")
    bw = (right - left) / n
    lower = [0] * n
    present = [(a, s) for a, s in data.counts if sum(s)]
    for action, series in present:
        upper = [lo + c for lo, c in zip(lower, series, strict=True)]
        pts = []
        for i in range(n):
            pts += [(left + i * bw, ypos(upper[i])), (left + (i + 1) * bw, ypos(upper[i]))]
        for i in reversed(range(n)):
            pts += [(left + (i + 1) * bw, ypos(lower[i])), (left + i * bw, ypos(lower[i]))]
        d = "M" + " L".join(f"{_f(x)},{_f(y)}" for x, y in pts) + " Z"
        svg.add(f'<path d="{d}" fill="{ACTION_COLOURS[action]}" class="area">'
                f"<title>{_e(action)}: {sum(series):,}</title></path>")
        lower = upper
    # hover targets: one per bucket, with its breakdown
    for i in range(n):
        parts = [f"{a} {s[i]:,}" for a, s in present if s[i]]
        tip = f"{_when(data, i * data.bucket_s)} (+{per}): {totals[i]:,} outcomes"
        if parts:
            tip += " — " + ", ".join(parts)
        svg.rect(left + i * bw, top, bw, bottom - top, tip=tip, cls="hover")
    svg.line(left, bottom, right, bottom, "axis")
    svg.text(left - 52, (top + bottom) / 2, f"outcomes per {per}", "axis-title", "middle",
             f' transform="rotate(-90 {_f(left - 52)} {_f((top + bottom) / 2)})"')
    svg.text((left + right) / 2, height - 6, axis_title, "axis-title", "middle")
    for x, y, action, total in legend:
        svg.rect(x, y, 12, 12, ACTION_COLOURS[action], cls="" if total else "dim")
        svg.text(x + 17, y + 10, f"{action} {total:,}", "legend" if total else "legend dim")
    return svg.done()


def _peak(data: Timeline) -> str:
    totals = data.totals()
    if not totals or not max(totals):
        return ""
    peak = max(range(len(totals)), key=lambda i: totals[i])
    return (f" Busiest: {totals[peak]:,} outcomes in the {_bucket_label(data.bucket_s)} from "
            f"{_when(data, peak * data.bucket_s)}.")


def _action_rows_chart(data: Timeline, width: float = 1130) -> str:
    """Each action on its own scale: small rows sharing the time axis."""
    ident = "actions-chart"
    title = f"Each action over time, per {_bucket_label(data.bucket_s)}, own scale per row"
    present = [(a, s) for a, s in data.counts if sum(s)]
    if not present:
        return ""
    left, right, top, row = _TIME_LEFT, width - 16, 8, 36
    n = data.buckets
    bottom = top + row * len(present)
    height = bottom + 40
    svg = _Svg(ident, width, height, title)
    total_s = n * data.bucket_s
    ticks, axis_title = _time_ticks(data, total_s, right - left)
    for offset, label in ticks:
        gx = left + offset / total_s * (right - left)
        svg.line(gx, top, gx, bottom, "grid")
        svg.text(gx, bottom + 16, label, "tick", "middle")
    bw = (right - left) / n
    for r, (action, series) in enumerate(present):
        y0 = top + r * row
        base = y0 + row - 4
        peak = max(series) or 1
        svg.line(left, base, right, base, "baseline")
        pts: list[tuple[float, float]] = [(left, base)]
        for i, c in enumerate(series):
            h = c / peak * (row - 8)
            pts += [(left + i * bw, base - h), (left + (i + 1) * bw, base - h)]
        pts.append((right, base))
        d = "M" + " L".join(f"{_f(x)},{_f(y)}" for x, y in pts) + " Z"
        colour = ACTION_COLOURS[action]
        svg.add(f'<path d="{d}" fill="{colour}" fill-opacity="0.85">'
                f"<title>{_e(action)}: {sum(series):,}, at most {peak:,} per bucket</title>"
                "</path>")
        svg.text(left - 10, y0 + row / 2 + 1, action, "label", "end")
        svg.text(left - 10, y0 + row / 2 + 13, f"max {peak:,}", "note", "end")
    svg.text((left + right) / 2, height - 4, axis_title, "axis-title", "middle")
    return svg.done()


def _escalations_chart(instances: Sequence[InstanceCounts], width: float = 456,
                       limit: int = 25) -> str:
    ident, title = "escalations-chart", "Escalations per instance"
    if not instances:
        return _empty_chart(ident, title, width, 160, "no instances")
    ranked = sorted(instances, key=lambda i: (-i.get("escalated"), -i.get("held"), i.name))
    shown, rest = ranked[:limit], ranked[limit:]
    names = [_clip(i.name, 22) for i in shown]
    label_w = max(60.0, min(170.0, max(_text_px(n, 12.5, True) for n in names) + 14))
    left, right, top, row = label_w, width - 84, 34, 30
    height = top + row * len(shown) + 40 + (18 if rest else 0)
    svg = _Svg(ident, width, height, title)
    top_value = max(max(i.get("escalated") + i.get("held") for i in shown), 1)
    end, ticks = _linear_ticks(top_value, 4, integer=True)
    bottom = top + row * len(shown)
    for v in ticks:
        gx = left + v / end * (right - left)
        svg.line(gx, top - 4, gx, bottom, "grid")
        svg.text(gx, bottom + 16, _num(v), "tick", "middle")
    x = left
    for action, text in (("escalated", "escalated"), ("held", "held")):
        svg.rect(x, 8, 12, 12, ACTION_COLOURS[action])
        svg.text(x + 17, 18, text, "legend")
        x += 17 + _text_px(text) + 18
    for r, (inst, name) in enumerate(zip(shown, names, strict=True)):
        y = top + r * row
        esc, held, turns = inst.get("escalated"), inst.get("held"), inst.turns
        w_esc = esc / end * (right - left)
        w_held = held / end * (right - left)
        share = f"{esc / turns:.1%}" if turns else "–"
        svg.rect(left, y + 6, w_esc, row - 12, ACTION_COLOURS["escalated"],
                 tip=f"{inst.name}: {esc:,} escalated of {turns:,} turns ({share})")
        svg.rect(left + w_esc, y + 6, w_held, row - 12, ACTION_COLOURS["held"],
                 tip=f"{inst.name}: {held:,} held")
        svg.text(left - 10, y + row / 2 + 4, name, "label", "end",
                 f' data-full="{_e(inst.name)}"' if name != inst.name else "")
        svg.text(left + w_esc + w_held + 6, y + row / 2 + 4,
                 f"{esc:,} · {share}", "value")
    svg.line(left, top - 4, left, bottom, "axis")
    if rest:
        more = sum(i.get("escalated") for i in rest)
        svg.text(left, bottom + 34, f"+ {len(rest)} more instances with {more:,} escalations",
                 "note")
    svg.text((left + right) / 2, height - 6 - (18 if rest else 0), "messages", "axis-title",
             "middle")
    return svg.done()


def _action_strip(data: ReportData) -> str:
    """One 100 % bar of all outcomes by action, with its legend."""
    total = sum(n for _, n in data.actions)
    svg = _Svg("actions-strip", 1130, 30, "Outcomes by action")
    if total:
        x = 0.0
        for action, n in data.actions:
            if not n:
                continue
            w = n / total * 1130
            svg.rect(x, 4, w, 22, ACTION_COLOURS[action],
                     tip=f"{action}: {n:,} ({n / total:.1%})")
            x += w
    else:
        svg.rect(0, 4, 1130, 22, "#f1f3f5")
    return svg.done()


# ------------------------------------------------------------------------------- the page

_CSS = """
:root { --ink: #212529; --muted: #6c757d; --line: #dee2e6; --bg: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "DejaVu Sans", sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 28px 24px 40px; }
header h1 { font-size: 26px; margin: 0 0 2px; font-weight: 650; letter-spacing: -0.01em; }
header .sub { color: var(--muted); margin: 0 0 18px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 16px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: 0.04em; }
.card .v { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
.card .d { color: var(--muted); font-size: 12.5px; }
.card.bad .v { color: #c92a2a; }
section.panel { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 16px 20px 14px; margin-bottom: 16px; }
section.panel h2 { font-size: 16px; margin: 0 0 2px; font-weight: 650; }
section.panel p.what { color: var(--muted); margin: 0 0 10px; font-size: 13px; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; align-items: start; }
.row > section.panel { margin-bottom: 16px; min-width: 0; }
.row.inner { gap: 32px; grid-template-columns: 5fr 7fr; }
.row.inner > div { min-width: 0; }
.who span { white-space: nowrap; }
svg.chart { display: block; max-width: 100%; height: auto; font-variant-numeric: tabular-nums; }
svg text { font-size: 12px; fill: var(--ink); }
svg .tick { font-size: 11px; fill: var(--muted); }
svg .legend { font-size: 12px; }
svg .dim { opacity: 0.35; }
svg .note { font-size: 11px; fill: var(--muted); }
svg .value { font-size: 11.5px; fill: #343a40; }
svg .small { font-size: 10.5px; }
svg .label { font-size: 12.5px; font-weight: 600; }
svg .axis-title { font-size: 11.5px; fill: var(--muted); }
svg .empty { font-size: 14px; fill: var(--muted); }
svg .empty-frame { fill: #f8f9fa; stroke: var(--line); stroke-dasharray: 4 4; }
svg .grid { stroke: #e9ecef; stroke-width: 1; }
svg .grid.minor { stroke: #f3f4f6; }
svg .axis { stroke: #adb5bd; stroke-width: 1; }
svg .baseline { stroke: #dee2e6; stroke-width: 1; }
svg .hover { fill: transparent; }
svg .hover:hover { fill: rgba(33, 37, 41, 0.06); }
svg .area { stroke: #fff; stroke-width: 0.4; }
.legend-list { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 8px 0 0; padding: 0;
  list-style: none; font-size: 13px; }
.legend-list i { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; }
.legend-list b { font-variant-numeric: tabular-nums; font-weight: 600; }
.legend-list span.pct { color: var(--muted); }
table { border-collapse: collapse; width: 100%; table-layout: fixed; font-size: 13px;
  font-variant-numeric: tabular-nums; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
  border-bottom: 1px solid var(--line); padding: 6px 8px; white-space: nowrap; }
td { border-bottom: 1px solid #f1f3f5; padding: 6px 8px; vertical-align: top; }
td.n, th.n { text-align: right; white-space: nowrap; }
td.reason { overflow-wrap: anywhere; }
td.who { color: var(--muted); overflow-wrap: anywhere; }
.bar { display: inline-block; height: 8px; border-radius: 2px; background: #f76707;
  vertical-align: 0; margin-right: 6px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono",
  monospace; font-size: 12.5px; }
ul.invalid { margin: 0; padding-left: 18px; }
ul.invalid li { overflow-wrap: anywhere; margin: 2px 0; }
.muted { color: var(--muted); }
footer { color: var(--muted); font-size: 12px; margin-top: 8px; }
@media (max-width: 900px) { .row { grid-template-columns: 1fr; }
  .cards { grid-template-columns: repeat(2, 1fr); } }
"""


def _card(key: str, value: str, detail: str = "", bad: bool = False) -> str:
    cls = "card bad" if bad else "card"
    d = f'<div class="d">{detail}</div>' if detail else ""
    return f'<div class="{cls}"><div class="k">{_e(key)}</div><div class="v">{value}</div>{d}</div>'


def _header(data: ReportData) -> str:
    sources = ", ".join(data.sources) or "(no log named)"
    invalid = data.action("invalid")
    speedup = (f"{data.virtual_s / data.real_s:,.0f}× faster than recorded"
               if data.real_s > 0 and data.virtual_s > data.real_s else "")
    per_event = (f"{data.round_trips / data.events:.2f} per event" if data.events else "")
    cards = [
        _card("events", f"{data.events:,}",
              _e(_rate(data.events, data.virtual_s)).replace("/", " events/", 1)
              + " at the recorded pace" if data.virtual_s > 0 else "read from the logs"),
        _card("outcomes", f"{data.outcomes:,}",
              f"{data.action('replied'):,} replied · {data.action('escalated'):,} escalated"),
        _card(f"duration, {data.clock} clock", _e(_duration(data.virtual_s)),
              "span of the replayed traffic"),
        _card("duration, real time", _e(_duration(data.real_s)), _e(speedup)),
        _card("throughput", _e(_rate(data.events, data.real_s)).replace("/", " events/", 1)
              if data.real_s > 0 else "–", "per second of real time"),
        _card("database round trips", f"{data.round_trips:,}", _e(per_event)),
        _card("invalid lines", f"{invalid:,}", "listed below" if data.invalid else "none",
              bad=invalid > 0),
        _card("failed turns", f"{data.failed_turns:,}",
              "left pending in the inbox" if data.failed_turns else "none",
              bad=data.failed_turns > 0),
    ]
    total = sum(n for _, n in data.actions)
    legend = "".join(
        f'<li><i style="background:{ACTION_COLOURS[a]}"></i>{_e(a)} <b>{n:,}</b> '
        f'<span class="pct">{(n / total if total else 0):.1%}</span></li>'
        for a, n in data.actions
    )
    return (f'<header><h1>{_e(data.title)}</h1>'
            f'<p class="sub">{_e(sources)} · {_e(data.clock)} clock</p></header>'
            f'<div class="cards">{"".join(cards)}</div>'
            f'<section class="panel" id="actions"><h2>Outcomes by action</h2>'
            f'<p class="what">What happened to each inbound message; the colours are the same '
            f'in every chart.</p>{_action_strip(data)}<ul class="legend-list">{legend}</ul>'
            f"</section>")


def _stage_table(stages: Sequence[StageLatency], operations: Sequence[StageLatency]) -> str:
    if not stages and not operations:
        return ""
    head = ("<tr><th>stage</th><th class=n>in</th><th class=n>out</th><th class=n>errors</th>"
            "<th class=n>dropped</th><th class=n>peak queue</th><th class=n>p50</th>"
            "<th class=n>p95</th><th class=n>p99</th><th class=n>max</th></tr>")
    rows = "".join(
        f"<tr><td>{_e(s.name)}</td><td class=n>{s.received:,}</td><td class=n>{s.sent:,}</td>"
        f"<td class=n>{s.errors:,}</td><td class=n>{s.dropped:,}</td>"
        f"<td class=n>{s.queue_peak:,}</td><td class=n>{_e(_ms(s.p50_ms))}</td>"
        f"<td class=n>{_e(_ms(s.p95_ms))}</td><td class=n>{_e(_ms(s.p99_ms))}</td>"
        f"<td class=n>{_e(_ms(s.max_ms))}</td></tr>"
        for s in stages
    )
    out = f"<table>{head}{rows}</table>" if stages else ""
    if operations:
        ohead = ("<tr><th>operation</th><th class=n>count</th><th class=n>mean</th>"
                 "<th class=n>p50</th><th class=n>p95</th><th class=n>p99</th>"
                 "<th class=n>max</th></tr>")
        orows = "".join(
            f"<tr><td>{_e(o.name)}</td><td class=n>{o.count:,}</td>"
            f"<td class=n>{_e(_ms(o.mean_ms))}</td><td class=n>{_e(_ms(o.p50_ms))}</td>"
            f"<td class=n>{_e(_ms(o.p95_ms))}</td><td class=n>{_e(_ms(o.p99_ms))}</td>"
            f"<td class=n>{_e(_ms(o.max_ms))}</td></tr>"
            for o in operations
        )
        out += f'<table style="margin-top:14px">{ohead}{orows}</table>'
    return out


def _reasons_table(reasons: Sequence[ReasonCount], limit: int = 20) -> str:
    if not reasons:
        return '<p class="muted">No escalations.</p>'
    total = sum(r.count for r in reasons) or 1
    peak = max(r.count for r in reasons) or 1
    rows = []
    for r in reasons[:limit]:
        who = ", ".join(f'<span title="{_e(i)}">{_e(_clip(i, 24))} {n:,}</span>'
                        for i, n in r.instances[:3])
        if len(r.instances) > 3:
            who += f", +{len(r.instances) - 3} more"
        rows.append(
            f'<tr><td class="reason">{_e(r.reason)}</td>'
            f'<td class=n><span class="bar" style="width:{r.count / peak * 48:.0f}px"></span>'
            f"{r.count:,}</td><td class=n>{r.count / total:.0%}</td>"
            f'<td class="who">{who}</td></tr>')
    more = ""
    if len(reasons) > limit:
        rest = reasons[limit:]
        more = (f'<tr><td class="muted" colspan=4>+ {len(rest)} more reasons, '
                f"{sum(r.count for r in rest):,} escalations</td></tr>")
    return ('<table id="escalation-reasons"><colgroup><col style="width:36%">'
            '<col style="width:84px"><col style="width:50px"><col></colgroup>'
            '<tr><th>reason</th><th class=n>count</th><th class=n>share</th>'
            f'<th>instances</th></tr>{"".join(rows)}{more}</table>')


def _invalid_list(data: ReportData) -> str:
    invalid = data.action("invalid")
    if not invalid:
        return ""
    items = "".join(f'<li class="mono">{_e(line)}</li>' for line in data.invalid)
    more = (f'<p class="muted">{invalid - len(data.invalid):,} more not listed.</p>'
            if invalid > len(data.invalid) else "")
    return (f'<section class="panel" id="invalid"><h2>Invalid lines ({invalid:,})</h2>'
            f'<p class="what">Skipped by the replay, with file and line.</p>'
            f'<ul class="invalid">{items}</ul>{more}</section>')


def render_report(data: ReportData) -> str:
    """The report as one self-contained HTML page."""
    tl = data.timeline
    csp = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
           "base-uri 'none'; form-action 'none'")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(data.title)}</title><style>{_CSS}</style></head><body><main>",
        _header(data),
        '<section class="panel" id="throughput"><h2>Throughput over time</h2>'
        f'<p class="what">Outcomes per {_e(_bucket_label(tl.bucket_s))} of {_e(data.clock)} '
        f"time, stacked by action; below, each action on its own scale.{_e(_peak(tl))} "
        "Hover a column for its breakdown.</p>",
        _throughput_chart(tl),
        _action_rows_chart(tl),
        "</section>",
        '<div class="row">',
        '<section class="panel" id="latency"><h2>Latency per stage</h2>'
        '<p class="what">Real time each stage spent per item: 50th, 95th and 99th '
        "percentile.</p>",
        _latency_chart(data.stages),
        "</section>",
        '<section class="panel" id="distribution"><h2>Latency distribution</h2>'
        '<p class="what">Histogram per stage on one shared log axis, with the '
        "percentiles marked.</p>",
        _histograms_chart(data.stages),
        "</section></div>",
        '<section class="panel" id="escalations"><div class="row inner"><div>'
        "<h2>Escalations per instance</h2>"
        '<p class="what">Turns handed to a human, and turns held because a human already '
        "has the conversation; the label gives the share of the instance's turns.</p>",
        _escalations_chart(data.instances),
        '</div><div id="reasons"><h2>Escalation reasons</h2>'
        '<p class="what">Why turns were handed over, most frequent first.</p>',
        _reasons_table(data.reasons),
        "</div></div></section>",
        _invalid_list(data),
    ]
    table = _stage_table(data.stages, data.operations)
    if table:
        parts.append('<section class="panel" id="stages"><h2>Stages</h2>'
                     '<p class="what">Counts, peak queue depth and latency (real time).</p>'
                     f"{table}</section>")
    footer = "Self-contained report: no network, no scripts."
    if data.generated:
        footer = f"{_e(data.generated)} · {footer}"
    parts += [f"<footer>{footer}</footer>", "</main></body></html>", ""]
    return "\n".join(parts)
