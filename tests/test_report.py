"""The HTML report: self-contained, escaped, the charts there, sane on empty and tiny runs,
and the collector's memory bounded however long the run."""

from __future__ import annotations

import datetime as dt
import math
import random
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Any

import pytest

from pipeline.metrics import Metrics
from pipeline.report import ReportCollector, ReportData, render_report
from stages.outcomes import OutcomeSink
from stages.records import ACTIONS, Outcome

HOSTILE = "<script>alert(1)</script>"
T0 = dt.datetime(2025, 8, 31, 9, 0, tzinfo=dt.UTC)
CHARTS = ("latency-chart", "latency-histograms", "throughput-chart", "escalations-chart")


class Page(HTMLParser):
    """Every tag with its attributes, and the text outside tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Page:
    p = Page()
    p.feed(page)
    p.close()
    return p


def outcome(action: str, instance: str | None = "acme", reason: str | None = None,
            origin: str = "") -> Outcome:
    return Outcome(action, f"wamid.{random.random()}", instance, "5511999990000",  # type: ignore[arg-type]
                   reason=reason, origin=origin)


def feed(outcomes: list[tuple[float, Outcome]], *, virtual_s: float | None = None,
         metrics: Metrics | None = None, **kwargs: Any) -> tuple[ReportData, ReportCollector]:
    collector = ReportCollector(start=0.0, started_at=kwargs.pop("started_at", T0))
    sink = OutcomeSink()
    for at, o in outcomes:
        collector.record(o, at)
        sink.record(o)
    metrics = metrics or Metrics()
    data = collector.finish(metrics, sink, events=kwargs.pop("events", len(outcomes)),
                            real_s=kwargs.pop("real_s", 1.5), round_trips=42,
                            virtual_s=virtual_s, **kwargs)
    return data, collector


def busy_metrics(seed: int = 1) -> Metrics:
    rng = random.Random(seed)
    m = Metrics()
    for name, median in (("intake", 2.0), ("dedupe", 0.05), ("turns", 1500.0),
                         ("context", 3.0), ("dispatch", 5.0)):
        stage = m.stage(name)
        for _ in range(500):
            stage.latency.record(rng.lognormvariate(math.log(median), 0.5))
        stage.received = stage.sent = 500
    m.operation("load_context").record(2.5)
    return m


def realistic(seed: int = 3) -> list[tuple[float, Outcome]]:
    rng = random.Random(seed)
    out = []
    for i in range(3000):
        at = rng.uniform(0, 3 * 3600)
        action = rng.choices(ACTIONS, [60, 6, 5, 10, 4, 1, 14])[0]
        inst = rng.choice(["acme", "loja", HOSTILE]) if action != "invalid" else None
        reason = rng.choice(["keyword: atendente", f"explicit request {HOSTILE}"]) \
            if action == "escalated" else "bad json" if action == "invalid" else None
        out.append((at, outcome(action, inst, reason, origin=f"day.jsonl:{i}")))
    out.sort(key=lambda pair: pair[0])
    return out


def test_page_is_self_contained_and_has_the_charts() -> None:
    data, _ = feed(realistic(), metrics=busy_metrics(), sources=["logs/day.jsonl"])
    page = render_report(data)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page.lower() and "<script" not in page.lower()
    assert "@import" not in page and "url(" not in page
    parsed = parse(page)
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "iframe", "img", "object", "embed"), tag
        for name in ("src", "href", "xlink:href", "action"):
            assert name not in attrs, (tag, attrs)
        assert not any(a.startswith("on") for a in attrs), (tag, attrs)
    csp = [a["content"] for t, a in parsed.tags
           if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0] or "")
    svgs = {a.get("id"): a for t, a in parsed.tags if t == "svg"}
    for ident in CHARTS:
        assert ident in svgs, ident
    titles = {a.get("id") for t, a in parsed.tags if t == "title"}
    assert {f"{ident}-title" for ident in CHARTS} <= titles
    # each chart is well-formed XML, so a browser draws it as written
    for fragment in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        ET.fromstring(fragment)
    assert render_report(data) == page  # deterministic


def test_untrusted_strings_are_escaped() -> None:
    evil_file = '"><img src=x onerror=alert(2)>.jsonl'
    events = [(1.0, outcome("escalated", HOSTILE, f"keyword: {HOSTILE}")),
              (2.0, outcome("replied", HOSTILE)),
              (3.0, outcome("invalid", None, f"not json {HOSTILE}", origin=f"{evil_file}:7"))]
    data, _ = feed(events, sources=[evil_file], title=f"report {HOSTILE}",
                   generated=HOSTILE)
    page = render_report(data)
    assert HOSTILE not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = parse(page)
    assert not any(t in ("script", "img") for t, _ in parsed.tags)
    text = "".join(parsed.text)
    assert HOSTILE in text  # shown to the reader as text, in the charts and tables
    assert f"{evil_file}:7: not json {HOSTILE}" in text
    assert "onerror" not in {a for _, attrs in parsed.tags for a in attrs}


def test_empty_run() -> None:
    data, _ = feed([], events=0, real_s=0.0)
    assert data.outcomes == 0 and data.timeline.buckets == 1
    page = render_report(data)
    assert page.count("no outcomes") >= 1
    assert "no latencies recorded" in page
    for ident in CHARTS:
        assert f'id="{ident}"' in page
    for fragment in re.findall(r"<svg\b.*?</svg>", page, flags=re.S):
        ET.fromstring(fragment)
    # a collector that never saw anything, with no start and no numbers at all
    bare = ReportCollector().finish(Metrics(), OutcomeSink(), events=0, real_s=0.0)
    render_report(bare)
    render_report(ReportData())


def test_one_bucket_run() -> None:
    events = [(0.0, outcome("replied")), (0.0, outcome("escalated", reason="keyword: x")),
              (0.0, outcome("held"))]
    data, _ = feed(events, virtual_s=0.0, real_s=0.0,
                   metrics=busy_metrics(), started_at=None)
    assert data.timeline.buckets == 1
    assert data.timeline.totals() == [3]
    assert data.virtual_s == 0.0
    page = render_report(data)
    assert 'id="throughput-chart"' in page and "no outcomes" not in page
    # a single latency value: one bucket, no spread
    m = Metrics()
    m.stage("intake").latency.record(3.0)
    data, _ = feed([(0.0, outcome("replied"))], metrics=m)
    assert "nan" not in render_report(data).lower()


@pytest.mark.parametrize("span_s", [0.2, 3.0, 45.0, 600.0, 3 * 3600.0, 86_400.0,
                                    7 * 86_400.0, 40 * 86_400.0])
def test_bucket_width_gives_60_to_120_buckets(span_s: float) -> None:
    steps = 500
    events = [(span_s * i / steps, outcome("replied")) for i in range(steps + 1)]
    data, collector = feed(events, virtual_s=span_s)
    tl = data.timeline
    assert 60 <= tl.buckets <= 121, (span_s, tl.bucket_s, tl.buckets)
    assert sum(tl.totals()) == steps + 1
    assert tl.buckets * tl.bucket_s >= span_s
    assert len(collector.buckets) <= collector.max_buckets
    render_report(data)


def test_collector_memory_is_bounded_and_counts_exact() -> None:
    collector = ReportCollector(max_buckets=50)
    sink = OutcomeSink()
    rng = random.Random(5)
    t = first = 1000.0
    for _ in range(20_000):
        o = outcome(rng.choice(ACTIONS))
        collector.record(o, t)
        sink.record(o)
        assert len(collector.buckets) <= 50
        t += rng.expovariate(0.5)
    data = collector.finish(Metrics(), sink, events=20_000, real_s=2.0)
    totals = dict(data.timeline.counts)
    for action in ACTIONS:
        assert sum(totals[action]) == sink.actions[action]
    assert data.virtual_s == pytest.approx(collector.last)
    assert collector.start == first and collector.last > 10 * 3600


def test_escalations_per_instance_and_reasons() -> None:
    events = [(1.0, outcome("escalated", "acme", "keyword: atendente")),
              (2.0, outcome("escalated", "acme", "keyword: atendente")),
              (3.0, outcome("escalated", "loja", "keyword: atendente")),
              (4.0, outcome("escalated", "loja", "explicit request")),
              (5.0, outcome("replied", "loja")), (6.0, outcome("held", "acme"))]
    data, _ = feed(events)
    assert [(r.reason, r.count, r.instances) for r in data.reasons] == [
        ("keyword: atendente", 3, (("acme", 2), ("loja", 1))),
        ("explicit request", 1, (("loja", 1),)),
    ]
    counts = {i.name: (i.get("escalated"), i.turns) for i in data.instances}
    assert counts == {"acme": (2, 3), "loja": (2, 3)}
    page = render_report(data)
    assert "keyword: atendente" in page and 'id="escalation-reasons"' in page
    assert "2 · 66.7%" in page


def test_summary_numbers_in_the_header() -> None:
    events = [(1.0, outcome("invalid", None, "line is not valid json",
                            origin="logs/a.jsonl:38"))]
    data, _ = feed(events, events=107, real_s=0.18, virtual_s=3600.0)
    text = "".join(parse(render_report(data)).text)
    assert "107" in text and "42" in text  # events, round trips
    assert "1 h" in text and "180 ms" in text  # virtual and real duration
    assert "594 events/s" in text
    assert "logs/a.jsonl:38: line is not valid json" in text


def test_few_outcomes_get_fewer_wider_buckets() -> None:
    events = [(i * 0.37, outcome("replied")) for i in range(108)]  # the bundled sample's size
    data, _ = feed(events)
    assert 10 <= data.timeline.buckets <= 27
    assert sum(data.timeline.totals()) == 108
