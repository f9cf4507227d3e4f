"""The report page: one self-contained HTML document, the same bytes for the same data.

It needs no network at all: inline CSS, the charts as inline SVG, no scripts, and a
Content-Security-Policy that forbids every fetch. Every string that comes from the data
(instance names, reasons, file names) is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.report.axes import when
from pipeline.report.charts import (
    ACTION_COLOURS,
    action_rows_chart,
    action_strip,
    escalations_chart,
    histograms_chart,
    latency_chart,
    throughput_chart,
)
from pipeline.report.collect import ReasonCount, ReportData, StageLatency, Timeline
from pipeline.report.formatting import bucket_label, clip, duration, escape, latency, rate

_STAGE_COLUMNS = ("in", "out", "errors", "dropped", "peak queue", "p50", "p95", "p99", "max")
_OPERATION_COLUMNS = ("count", "mean", "p50", "p95", "p99", "max")

# inline: the Content-Security-Policy lets the page fetch no style sheet
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
    return (f'<div class="{cls}"><div class="k">{escape(key)}</div>'
            f'<div class="v">{value}</div>{d}</div>')


def _header(data: ReportData) -> str:
    sources = ", ".join(data.sources) or "(no log named)"
    invalid = data.action("invalid")
    speedup = (f"{data.virtual_s / data.real_s:,.0f}× faster than recorded"
               if data.real_s > 0 and data.virtual_s > data.real_s else "")
    per_event = (f"{data.round_trips / data.events:.2f} per event" if data.events else "")
    cards = [
        _card("events", f"{data.events:,}",
              escape(rate(data.events, data.virtual_s)).replace("/", " events/", 1)
              + " at the recorded pace" if data.virtual_s > 0 else "read from the logs"),
        _card("outcomes", f"{data.outcomes:,}",
              f"{data.action('replied'):,} replied · {data.action('escalated'):,} escalated"),
        _card(f"duration, {data.clock} clock", escape(duration(data.virtual_s)),
              "span of the replayed traffic"),
        _card("duration, real time", escape(duration(data.real_s)), escape(speedup)),
        _card("throughput", escape(rate(data.events, data.real_s)).replace("/", " events/", 1)
              if data.real_s > 0 else "–", "per second of real time"),
        _card("database round trips", f"{data.round_trips:,}", escape(per_event)),
        _card("invalid lines", f"{invalid:,}", "listed below" if data.invalid else "none",
              bad=invalid > 0),
        _card("failed turns", f"{data.failed_turns:,}",
              "left pending in the inbox" if data.failed_turns else "none",
              bad=data.failed_turns > 0),
    ]
    total = sum(n for _, n in data.actions)
    legend = "".join(
        f'<li><i style="background:{ACTION_COLOURS[a]}"></i>{escape(a)} <b>{n:,}</b> '
        f'<span class="pct">{(n / total if total else 0):.1%}</span></li>'
        for a, n in data.actions
    )
    return (f'<header><h1>{escape(data.title)}</h1>'
            f'<p class="sub">{escape(sources)} · {escape(data.clock)} clock</p></header>'
            f'<div class="cards">{"".join(cards)}</div>'
            f'<section class="panel" id="actions"><h2>Outcomes by action</h2>'
            f'<p class="what">What happened to each inbound message; the colours are the same '
            f'in every chart.</p>{action_strip(data)}<ul class="legend-list">{legend}</ul>'
            f"</section>")


def _stage_table(stages: Sequence[StageLatency], operations: Sequence[StageLatency]) -> str:
    """Counts and latencies per stage, then per operation inside the stages."""
    out = ""
    if stages:
        rows = "".join(
            _row(s.name, [*(f"{n:,}" for n in (s.received, s.sent, s.errors, s.dropped,
                                                s.queue_peak)),
                          *_latencies(s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms)])
            for s in stages
        )
        out = f"<table>{_head('stage', _STAGE_COLUMNS)}{rows}</table>"
    if operations:
        rows = "".join(
            _row(o.name, [f"{o.count:,}",
                          *_latencies(o.mean_ms, o.p50_ms, o.p95_ms, o.p99_ms, o.max_ms)])
            for o in operations
        )
        out += (f'<table style="margin-top:14px">{_head("operation", _OPERATION_COLUMNS)}'
                f"{rows}</table>")
    return out


def _head(first: str, numbers: Sequence[str]) -> str:
    return (f"<tr><th>{first}</th>" + "".join(f"<th class=n>{c}</th>" for c in numbers)
            + "</tr>")


def _row(name: str, numbers: Sequence[str]) -> str:
    return (f"<tr><td>{escape(name)}</td>" + "".join(f"<td class=n>{c}</td>" for c in numbers)
            + "</tr>")


def _latencies(*ms: float) -> list[str]:
    return [escape(latency(v)) for v in ms]


def _reasons_table(reasons: Sequence[ReasonCount], limit: int = 20) -> str:
    if not reasons:
        return '<p class="muted">No escalations.</p>'
    total = sum(r.count for r in reasons) or 1
    peak = max(r.count for r in reasons) or 1
    rows = []
    for r in reasons[:limit]:
        who = ", ".join(f'<span title="{escape(i)}">{escape(clip(i, 24))} {n:,}</span>'
                        for i, n in r.instances[:3])
        if len(r.instances) > 3:
            who += f", +{len(r.instances) - 3} more"
        rows.append(
            f'<tr><td class="reason">{escape(r.reason)}</td>'
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
    items = "".join(f'<li class="mono">{escape(line)}</li>' for line in data.invalid)
    more = (f'<p class="muted">{invalid - len(data.invalid):,} more not listed.</p>'
            if invalid > len(data.invalid) else "")
    return (f'<section class="panel" id="invalid"><h2>Invalid lines ({invalid:,})</h2>'
            f'<p class="what">Skipped by the replay, with file and line.</p>'
            f'<ul class="invalid">{items}</ul>{more}</section>')


def _peak(data: Timeline) -> str:
    totals = data.totals()
    if not totals or not max(totals):
        return ""
    peak = max(range(len(totals)), key=lambda i: totals[i])
    return (f" Busiest: {totals[peak]:,} outcomes in the {bucket_label(data.bucket_s)} from "
            f"{when(data, peak * data.bucket_s)}.")


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
        f"<title>{escape(data.title)}</title><style>{_CSS}</style></head><body><main>",
        _header(data),
        '<section class="panel" id="throughput"><h2>Throughput over time</h2>'
        f'<p class="what">Outcomes per {escape(bucket_label(tl.bucket_s))} of {escape(data.clock)} '
        f"time, stacked by action; below, each action on its own scale.{escape(_peak(tl))} "
        "Hover a column for its breakdown.</p>",
        throughput_chart(tl),
        action_rows_chart(tl),
        "</section>",
        '<div class="row">',
        '<section class="panel" id="latency"><h2>Latency per stage</h2>'
        '<p class="what">Real time each stage spent per item: 50th, 95th and 99th '
        "percentile.</p>",
        latency_chart(data.stages),
        "</section>",
        '<section class="panel" id="distribution"><h2>Latency distribution</h2>'
        '<p class="what">Histogram per stage on one shared log axis, with the '
        "percentiles marked.</p>",
        histograms_chart(data.stages),
        "</section></div>",
        '<section class="panel" id="escalations"><div class="row inner"><div>'
        "<h2>Escalations per instance</h2>"
        '<p class="what">Turns handed to a human, and turns held because a human already '
        "has the conversation; the label gives the share of the instance's turns.</p>",
        escalations_chart(data.instances),
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
        footer = f"{escape(data.generated)} · {footer}"
    parts += [f"<footer>{footer}</footer>", "</main></body></html>", ""]
    return "\n".join(parts)
