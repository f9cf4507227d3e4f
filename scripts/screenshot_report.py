#!/usr/bin/env python3
"""Render a replay report to PNG with headless Chromium, to look at it.

    .venv/bin/python scripts/screenshot_report.py                 # a synthetic day
    .venv/bin/python scripts/screenshot_report.py report.html     # a report made by a replay
    .venv/bin/python scripts/screenshot_report.py --out shot.png --height 3000

Without a file, it builds a realistic synthetic run (a day of four instances with a daily
curve, bursts, escalations, a hostile instance name, invalid lines) through the real
:class:`ReportCollector`, writes it next to the PNG as ``.html`` and screenshots it.
Chromium runs with a throwaway profile and every background network feature off; the page
itself has a Content-Security-Policy that forbids any fetch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.metrics import Metrics
from pipeline.report import ReportCollector, ReportData, render_report
from stages.outcomes import OutcomeSink
from stages.records import Outcome

STAGES = {  # stage: (median ms, spread) of a log-normal
    "intake": (1.8, 0.6), "dedupe": (0.05, 0.5), "turns": (1500.0, 0.5),
    "context": (3.2, 0.45), "escalation": (0.02, 0.4), "respond": (0.4, 0.7),
    "dispatch": (4.5, 0.5),
}
INSTANCES = {"acme-support": 1.0, "loja-centro": 0.7, "clinica-sorriso": 0.35,
             "<script>alert(1)</script>": 0.05}
REASONS = ["keyword: atendente", "explicit request: falar com humano",
           "keyword: reclamação", "3 fallback answers in a row", "explicit request: agent",
           "keyword: hablar con una persona", "keyword: cancelar"]


def synthetic(seed: int = 7) -> ReportData:
    """A day of four instances, fed through the collector like a replay would."""
    rng = random.Random(seed)
    start = dt.datetime(2025, 8, 31, 0, 0, 4, tzinfo=dt.UTC)
    collector = ReportCollector(start=0.0, started_at=start)
    metrics, sink = Metrics(), OutcomeSink()
    for name in STAGES:
        metrics.stage(name)
    events = 0
    t = 0.0
    while t < 86_000:
        hour = t / 3600
        # quiet nights, a morning and an afternoon peak
        rate = 0.02 + 0.9 * math.exp(-((hour - 10.5) / 2.2) ** 2) \
            + 0.7 * math.exp(-((hour - 16) / 2.5) ** 2)
        t += rng.expovariate(rate)
        instance = rng.choices(list(INSTANCES), weights=list(INSTANCES.values()))[0]
        events += 1
        burst = 1 + (rng.random() < 0.15) * rng.randint(1, 3)
        for k in range(burst):
            at = t + 1.5 + k * 0.8
            r = rng.random()
            if k < burst - 1:
                action, reason = "merged", None
            elif r < 0.70:
                action, reason = "replied", None
            elif r < 0.76:
                action, reason = "escalated", rng.choices(REASONS, [9, 6, 3, 4, 2, 1, 1])[0]
            elif r < 0.83:
                action, reason = "held", None
            elif r < 0.87:
                action, reason = "duplicate", None
            elif r < 0.9995:
                action, reason = "ignored", None
            else:
                action, reason = "invalid", "line is not valid json"
            outcome = Outcome(action, f"wamid.{events}.{k}",  # type: ignore[arg-type]
                              None if action == "invalid" else instance, "5511999990000",
                              reason=reason, origin=f"logs/day-2025-08-31.jsonl:{events}")
            collector.record(outcome, at)
            sink.record(outcome)
            for name, (median, spread) in STAGES.items():
                stage = metrics.stage(name)
                if name in ("intake", "dedupe") or action in ("replied", "escalated", "held"):
                    stage.latency.record(rng.lognormvariate(math.log(median), spread))
                    stage.received += 1
                    stage.sent += 1
    for op, median in (("load_context", 2.9), ("commit_turn", 3.8), ("inbox_write", 1.5)):
        hist = metrics.operation(op)
        for _ in range(2000):
            hist.record(rng.lognormvariate(math.log(median), 0.5))
    metrics.stage("context").queue_peak = 12
    metrics.counters["failed turns"] = 0
    return collector.finish(metrics, sink, events=events, real_s=41.7,
                            round_trips=int(events * 1.7), virtual_s=86_400.0,
                            sources=["logs/day-2025-08-31.jsonl"],
                            generated="synthetic sample (scripts/screenshot_report.py)")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: apt-get install -y chromium")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> None:
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png.resolve()}", page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or not png.exists():
        sys.exit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("html", nargs="?", type=Path, help="a report page (default: synthetic)")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    page = args.html
    if page is None:
        page = args.out.with_suffix(".html")
        page.write_text(render_report(synthetic()), encoding="utf-8")
        print(f"wrote {page}")
    screenshot(page, args.out, args.width, args.height)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
