"""The report's charts, each one ``<svg>`` drawn from the report's data.

Latencies per stage (bars of p50/p95/p99 and histograms on a shared log axis), outcomes over
time (stacked, then each action on its own scale), escalations per instance, and the strip of
all outcomes by action. A chart with nothing to show is an empty frame that says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from pipeline.report.axes import LogScale, linear_ticks, time_ticks, when
from pipeline.report.collect import InstanceCounts, ReportData, StageLatency, Timeline
from pipeline.report.formatting import bucket_label, clip, escape, latency, num, text_px, tick_ms
from pipeline.report.svg import Svg, coord, empty_chart

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
_TIME_LEFT = 104  # left edge of the time axis, the same in both time charts


def _label_width(names: Iterable[str], widest: float) -> float:
    """Room for the row labels (bold, 12.5 px) left of a chart: 60 px to ``widest``."""
    return max(60.0, min(widest, max(text_px(n, 12.5, True) for n in names) + 14))


def latency_chart(stages: Sequence[StageLatency], width: float = 536) -> str:
    """Bars of each stage's p50, p95 and p99; on a log axis when they span a lot."""
    ident, title = "latency-chart", "Latency per stage: p50, p95, p99"
    shown = [s for s in stages if s.count]
    if not shown:
        return empty_chart(ident, title, width, 200, "no latencies recorded")
    label_w = _label_width((clip(s.name, 20) for s in shown), 150.0)
    left, right, top, row = label_w, width - 64, 34, 46
    height = top + row * len(shown) + 44
    values = [v for s in shown for v in (s.p50_ms, s.p95_ms, s.p99_ms)]
    positive = [v for v in values if v > 0] or [0.001]
    use_log = max(values) / min(positive) > 30
    svg = Svg(ident, width, height, title + (" (log scale)" if use_log else ""))
    # legend
    x = left
    for name, colour in _PCT_COLOURS.items():
        svg.rect(x, 8, 12, 12, colour)
        svg.text(x + 17, 18, name, "legend")
        x += 58
    bottom = top + row * len(shown)
    scale: LogScale | None = None
    end = 1.0
    if use_log:
        scale = LogScale(min(positive), max(values), left, right)
        ticks = scale.ticks()
        for v, major in ticks:
            gx = scale(v)
            svg.line(gx, top - 4, gx, bottom, "grid" if major else "grid minor")
            if major or len(ticks) <= 12:
                svg.text(gx, bottom + 16, tick_ms(v), "tick", "middle")
    else:
        end, lin = linear_ticks(max(values))
        for v in lin:
            gx = left + v / end * (right - left)
            svg.line(gx, top - 4, gx, bottom, "grid")
            svg.text(gx, bottom + 16, tick_ms(v), "tick", "middle")

    def pos(v: float) -> float:
        if scale is not None:
            return scale(v)
        return left + v / end * (right - left)

    for r, s in enumerate(shown):
        y = top + r * row
        svg.text(left - 10, y + row / 2 + 4, clip(s.name, 20), "label", "end")
        for k, (name, v) in enumerate((("p50", s.p50_ms), ("p95", s.p95_ms),
                                       ("p99", s.p99_ms))):
            by = y + 6 + k * 11.5
            w = pos(v) - left
            svg.rect(left, by, w, 9, _PCT_COLOURS[name],
                     tip=f"{s.name} {name}: {latency(v)} ({s.count:,} measured)")
            if k == 2 or v > 0:
                svg.text(left + w + 4, by + 8.5, latency(v), "value small")
    svg.line(left, top - 4, left, bottom, "axis")
    svg.text((left + right) / 2, height - 6,
             "milliseconds" + (", log scale" if use_log else ""), "axis-title", "middle")
    return svg.done()


def histograms_chart(stages: Sequence[StageLatency], width: float = 536) -> str:
    """Each stage's latency histogram on one shared log axis, percentiles marked, so that
    the stages' shapes compare at a glance."""
    ident, title = "latency-histograms", "Latency distribution per stage"
    shown = [s for s in stages if s.count and s.buckets]
    if not shown:
        return empty_chart(ident, title, width, 200, "no latencies recorded")
    label_w = _label_width((clip(s.name, 20) for s in shown), 150.0)
    left, right, top, row = label_w, width - 24, 34, 46
    height = top + row * len(shown) + 44
    lo = min(s.buckets[0][0] for s in shown)
    hi = max(s.buckets[-1][1] for s in shown)
    scale = LogScale(lo, hi, left, right)
    svg = Svg(ident, width, height, title + " (log scale, shared)")
    x = left
    for name, colour in (("p50", "#495057"), ("p95", _PCT_COLOURS["p95"]),
                         ("p99", _PCT_COLOURS["p99"])):
        svg.add(f'<line x1="{coord(x)}" y1="9" x2="{coord(x)}" y2="21" stroke="{colour}" '
                'stroke-width="2"/>')
        svg.text(x + 6, 19, name, "legend")
        x += 50
    svg.text(right, 19, "bar height: share of the stage's items", "note", "end")
    bottom = top + row * len(shown)
    for v, major in scale.ticks():
        gx = scale(v)
        svg.line(gx, top - 4, gx, bottom, "grid" if major else "grid minor")
        if major or scale.hi - scale.lo <= 2:
            svg.text(gx, bottom + 16, tick_ms(v), "tick", "middle")
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
                     tip=f"{s.name}: {n:,} between {latency(a)} and {latency(z)}")
        for name, v, colour in (("p50", s.p50_ms, "#495057"), ("p95", s.p95_ms,
                                                               _PCT_COLOURS["p95"]),
                                ("p99", s.p99_ms, _PCT_COLOURS["p99"])):
            px = scale(v)
            svg.add(f'<line x1="{coord(px)}" y1="{coord(y + 4)}" x2="{coord(px)}" '
                    f'y2="{coord(base)}" stroke="{colour}" stroke-width="2">'
                    f"<title>{escape(s.name)} {name}: "
                    f'{escape(latency(v))}</title></line>')
        svg.text(left - 10, y + row / 2 + 4, clip(s.name, 20), "label", "end")
        svg.text(left - 10, y + row / 2 + 16, f"n={s.count:,}", "note", "end")
    svg.text((left + right) / 2, height - 6, "milliseconds, log scale", "axis-title", "middle")
    return svg.done()


def throughput_chart(data: Timeline, width: float = 1130) -> str:
    """Outcomes per time bucket, stacked by action, a tooltip per bucket with its breakdown."""
    ident = "throughput-chart"
    per = bucket_label(data.bucket_s)
    title = f"Outcomes over time, per {per}, stacked by action"
    totals = data.totals()
    if not totals or not sum(totals):
        return empty_chart(ident, title, width, 260, "no outcomes")
    left, right = _TIME_LEFT, width - 16
    # the legend on top, wrapped to the chart's width
    legend: list[tuple[float, float, str, int]] = []
    x, y = float(left), 12.0
    for action, series in data.counts:
        label = f"{action} {sum(series):,}"
        item = 17 + text_px(label, 12)
        if x > left and x + item > right:
            x, y = float(left), y + 20
        legend.append((x, y, action, sum(series)))
        x += item + 18
    top = y + 28
    height = top + 244 + 46
    bottom = height - 46
    n = len(totals)
    total_s = n * data.bucket_s
    y_end, y_ticks = linear_ticks(max(totals), integer=True)
    svg = Svg(ident, width, height, title)

    def ypos(v: float) -> float:
        return bottom - v / y_end * (bottom - top)

    for v in y_ticks:
        svg.line(left, ypos(v), right, ypos(v), "grid")
        svg.text(left - 8, ypos(v) + 4, num(v), "tick", "end")
    ticks, axis_title = time_ticks(data, total_s, right - left)
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
        d = "M" + " L".join(f"{coord(x)},{coord(y)}" for x, y in pts) + " Z"
        svg.add(f'<path d="{d}" fill="{ACTION_COLOURS[action]}" class="area">'
                f"<title>{escape(action)}: {sum(series):,}</title></path>")
        lower = upper
    # hover targets: one per bucket, with its breakdown
    for i in range(n):
        parts = [f"{a} {s[i]:,}" for a, s in present if s[i]]
        tip = f"{when(data, i * data.bucket_s)} (+{per}): {totals[i]:,} outcomes"
        if parts:
            tip += " — " + ", ".join(parts)
        svg.rect(left + i * bw, top, bw, bottom - top, tip=tip, cls="hover")
    svg.line(left, bottom, right, bottom, "axis")
    svg.text(left - 52, (top + bottom) / 2, f"outcomes per {per}", "axis-title", "middle",
             f' transform="rotate(-90 {coord(left - 52)} {coord((top + bottom) / 2)})"')
    svg.text((left + right) / 2, height - 6, axis_title, "axis-title", "middle")
    for x, y, action, total in legend:
        svg.rect(x, y, 12, 12, ACTION_COLOURS[action], cls="" if total else "dim")
        svg.text(x + 17, y + 10, f"{action} {total:,}", "legend" if total else "legend dim")
    return svg.done()


def action_rows_chart(data: Timeline, width: float = 1130) -> str:
    """Each action on its own scale: small rows sharing the time axis."""
    ident = "actions-chart"
    title = f"Each action over time, per {bucket_label(data.bucket_s)}, own scale per row"
    present = [(a, s) for a, s in data.counts if sum(s)]
    if not present:
        return ""
    left, right, top, row = _TIME_LEFT, width - 16, 8, 36
    n = data.buckets
    bottom = top + row * len(present)
    height = bottom + 40
    svg = Svg(ident, width, height, title)
    total_s = n * data.bucket_s
    ticks, axis_title = time_ticks(data, total_s, right - left)
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
        d = "M" + " L".join(f"{coord(x)},{coord(y)}" for x, y in pts) + " Z"
        colour = ACTION_COLOURS[action]
        svg.add(f'<path d="{d}" fill="{colour}" fill-opacity="0.85">'
                f"<title>{escape(action)}: {sum(series):,}, at most {peak:,} per bucket</title>"
                "</path>")
        svg.text(left - 10, y0 + row / 2 + 1, action, "label", "end")
        svg.text(left - 10, y0 + row / 2 + 13, f"max {peak:,}", "note", "end")
    svg.text((left + right) / 2, height - 4, axis_title, "axis-title", "middle")
    return svg.done()


def escalations_chart(instances: Sequence[InstanceCounts], width: float = 456,
                      limit: int = 25) -> str:
    """Escalated and held turns of the ``limit`` instances with the most, then a count of
    the rest, so that a run of hundreds of instances still gives a chart one can read."""
    ident, title = "escalations-chart", "Escalations per instance"
    if not instances:
        return empty_chart(ident, title, width, 160, "no instances")
    ranked = sorted(instances, key=lambda i: (-i.get("escalated"), -i.get("held"), i.name))
    shown, rest = ranked[:limit], ranked[limit:]
    names = [clip(i.name, 22) for i in shown]
    label_w = _label_width(names, 170.0)
    left, right, top, row = label_w, width - 84, 34, 30
    height = top + row * len(shown) + 40 + (18 if rest else 0)
    svg = Svg(ident, width, height, title)
    top_value = max(max(i.get("escalated") + i.get("held") for i in shown), 1)
    end, ticks = linear_ticks(top_value, 4, integer=True)
    bottom = top + row * len(shown)
    for v in ticks:
        gx = left + v / end * (right - left)
        svg.line(gx, top - 4, gx, bottom, "grid")
        svg.text(gx, bottom + 16, num(v), "tick", "middle")
    x = left
    for action in ("escalated", "held"):
        svg.rect(x, 8, 12, 12, ACTION_COLOURS[action])
        svg.text(x + 17, 18, action, "legend")
        x += 17 + text_px(action) + 18
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
                 f' data-full="{escape(inst.name)}"' if name != inst.name else "")
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


def action_strip(data: ReportData) -> str:
    """One 100 % bar of all outcomes by action (the page lists its legend below it)."""
    total = sum(n for _, n in data.actions)
    svg = Svg("actions-strip", 1130, 30, "Outcomes by action")
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
