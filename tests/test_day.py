"""The bundled day (pipeline/data/day.jsonl) and its generator (scripts/gen_day.py).

The committed file must be exactly what the generator writes with its defaults, every line
but the deliberately bad ones must read and parse, and the mix must be what the generator
promises: both formats, receipts, echoes, redeliveries (some out of order), bursts, media,
requests for a human in several languages, a daily curve, Zipf-like senders.
"""

from __future__ import annotations

import collections
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.recorded_log import LogError, read_log
from pipeline.responders import build_responder
from pipeline.rules import instance_directory, rules_from_config
from stages.parse import parse_event
from stages.records import Ignored, InboundMessage, Invalid, RawEvent

ROOT = Path(__file__).resolve().parent.parent
DAY = ROOT / "pipeline" / "data" / "day.jsonl"
SCRIPT = ROOT / "scripts" / "gen_day.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_day", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_day"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_day() -> ModuleType:
    return _generator()


class Day:
    """The committed day, read and parsed once."""

    def __init__(self) -> None:
        directory = instance_directory(load_config(None))
        self.lines = DAY.read_bytes().splitlines()
        self.bad: dict[int, str] = {}  # line number -> why
        self.events: list[RawEvent] = []
        self.messages: list[tuple[int, InboundMessage]] = []  # (line, message), file order
        self.ignored: list[tuple[int, Ignored]] = []
        for item in read_log(DAY):
            if isinstance(item, LogError):
                self.bad[item.line] = item.reason
                continue
            self.events.append(item)
            line = int(item.origin.rsplit(":", 1)[1])
            for record in parse_event(item, directory):
                if isinstance(record, Invalid):
                    self.bad[line] = record.reason
                elif isinstance(record, Ignored):
                    self.ignored.append((line, record))
                else:
                    self.messages.append((line, record))


@pytest.fixture(scope="module")
def day() -> Day:
    return Day()


# --- the generator ----------------------------------------------------------------------


def test_generator_rewrites_the_committed_file_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "day.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == DAY.read_bytes(), (
        "pipeline/data/day.jsonl is not what scripts/gen_day.py writes: run it again")


def test_generator_options_seed_and_events(tmp_path: Path) -> None:
    runs = []
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        out = tmp_path / f"{name}.jsonl"
        subprocess.run([sys.executable, str(SCRIPT), "--seed", seed, "--events", "800",
                        "--out", str(out)], check=True, capture_output=True)
        runs.append(out.read_bytes())
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert 700 <= runs[0].count(b"\n") <= 900


def test_the_deliberately_bad_lines_are_the_only_bad_ones(day: Day, gen_day: ModuleType) -> None:
    events = gen_day.generate()
    assert gen_day.render(events).encode() == DAY.read_bytes()
    planned = {number for number, event in enumerate(events, start=1)
               if event.kind == "malformed"}
    assert set(day.bad) == planned, {n: day.bad.get(n) for n in set(day.bad) ^ planned}
    assert 0.003 <= len(planned) / len(day.lines) <= 0.008
    reasons = " | ".join(day.bad.values())
    for kind in ("not valid json", "body is missing", "format must be",
                 "object must be 'whatsapp_business_account'", "from must be",
                 "event must be", "unknown instance"):
        assert kind in reasons, kind


# --- the mix ----------------------------------------------------------------------------


def test_size_formats_and_time_range(day: Day) -> None:
    assert DAY.stat().st_size < 4_000_000
    assert 3000 <= len(day.lines) <= 4000
    formats = collections.Counter(event.format for event in day.events)
    assert 0.45 <= formats["cloud-api"] / len(day.events) <= 0.7
    assert 0.3 <= formats["evolution"] / len(day.events) <= 0.55
    times = [event.received_at for event in day.events]
    assert times == sorted(times), "the log is in receipt order"
    assert all(t.date().isoformat() == "2025-09-01" and 8 <= t.hour < 22 for t in times)
    assert {m.instance for _, m in day.messages} == {"demo", "loja"}


def test_receipts_echoes_and_other_events(day: Day) -> None:
    reasons = collections.Counter(record.reason for _, record in day.ignored)
    statuses = collections.Counter(
        (record.format, record.receipt.status) for _, record in day.ignored
        if record.receipt is not None and not record.reason.startswith("own message"))
    receipts = {state: statuses[("cloud-api", state)] for state in
                ("sent", "delivered", "read", "failed")}
    assert all(receipts.values()), receipts
    assert 0.15 <= sum(receipts.values()) / len(day.lines) <= 0.4
    # Evolution's echoes: fromMe upserts and send.message events
    assert 160 <= reasons["own message (fromMe)"] <= 610
    evolution_updates = sum(n for (fmt, _), n in statuses.items() if fmt == "evolution")
    assert evolution_updates + reasons["event: messages.update"] >= 100
    assert reasons["event: connection.update"] >= 2
    # some receipts arrive out of order: delivered before sent, or read before delivered
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for _, record in day.ignored:
        if record.reason.startswith("receipt: ") and record.message_id:
            seen[record.message_id].append(record.reason.removeprefix("receipt: "))
    rank = {"sent": 0, "delivered": 1, "read": 2}
    backwards = sum(1 for states in seen.values()
                    if [rank[s] for s in states if s in rank]
                    != sorted(rank[s] for s in states if s in rank))
    assert backwards >= 10


def test_redeliveries_late_and_out_of_order(day: Day) -> None:
    first: dict[tuple[str, str], InboundMessage] = {}
    latest_sent: dict[tuple[str, str], Any] = {}
    redelivered = out_of_order = minutes_later = late_first = 0
    for _, message in day.messages:
        key = (message.instance, message.message_id)
        conversation = (message.instance, message.sender)
        newest = latest_sent.get(conversation)
        if key in first:
            redelivered += 1
            delay = (message.received_at - first[key].received_at).total_seconds()
            minutes_later += delay >= 60
            out_of_order += newest is not None and newest > message.sent_at
            continue
        first[key] = message
        late_first += newest is not None and newest > message.sent_at
        latest_sent[conversation] = max(newest or message.sent_at, message.sent_at)
    assert 0.015 <= redelivered / len(first) <= 0.06
    assert minutes_later >= redelivered / 2
    assert out_of_order >= 10, "redeliveries recorded after a later message of the sender"
    assert late_first >= 10, "first deliveries recorded after the sender's next message"


def test_senders_are_zipf_like_with_bursts_and_repeats(day: Day) -> None:
    unique = {(m.instance, m.message_id): m for _, m in day.messages}.values()
    per_sender = collections.Counter((m.instance, m.sender) for m in unique)
    counts = sorted(per_sender.values(), reverse=True)
    assert 300 <= len(counts) <= 500
    assert counts[0] >= 30
    assert sum(c <= 3 for c in counts) / len(counts) >= 0.6
    assert sum(counts[: len(counts) // 10]) / sum(counts) >= 0.35
    assert any(sender.endswith("@lid") for _, sender in per_sender)
    bursts = repeats = 0
    last: dict[tuple[str, str], InboundMessage] = {}
    said: dict[tuple[str, str, str], InboundMessage] = {}
    for message in sorted(unique, key=lambda m: m.received_at):
        conversation = (message.instance, message.sender)
        before = last.get(conversation)
        if before and (message.received_at - before.received_at).total_seconds() <= 1.5:
            bursts += 1
        last[conversation] = message
        if message.text:
            earlier = said.get((*conversation, message.text))
            if earlier and (message.received_at - earlier.received_at).total_seconds() <= 30:
                repeats += 1
            said[(*conversation, message.text)] = message
    assert bursts >= 100
    assert repeats >= 15


def test_daily_curve_has_morning_and_evening_peaks(day: Day) -> None:
    hours = collections.Counter(m.received_at.hour for _, m in day.messages)

    def mean(*which: int) -> float:
        return sum(hours[h] for h in which) / len(which)

    assert mean(10, 11) > 1.3 * mean(14, 15)
    assert mean(18, 19, 20) > 1.3 * mean(14, 15)
    assert mean(8) < mean(10, 11)


def test_message_kinds_in_both_formats(day: Day) -> None:
    kinds = collections.Counter((m.format, m.kind) for _, m in day.messages)
    for fmt in ("cloud-api", "evolution"):
        for kind in ("text", "image", "audio", "document", "location", "reaction"):
            assert kinds[(fmt, kind)], (fmt, kind)
    assert kinds[("cloud-api", "interactive")] >= 10
    assert kinds[("cloud-api", "button")]
    images = [m for _, m in day.messages if m.kind == "image"]
    assert any(m.text for m in images) and any(not m.text for m in images)
    assert any(m.reply_to for _, m in day.messages if m.kind == "text")


def test_languages_escalations_and_rules(day: Day) -> None:
    cfg = load_config(None)
    texts = [m.text for _, m in day.messages if m.kind == "text"]
    arabic = [t for t in texts if re.search("[\u0600-\u06ff]", t)]
    assert len(arabic) >= 20
    assert "أريد التحدث مع شخص" in texts
    assert any(re.search(r"\b(hola|gracias)\b", t, re.I) for t in texts)
    assert any(re.search(r"\b(obrigad[oa]|você|vocês)\b", t, re.I) for t in texts)
    instances = {instance.name: instance for instance in cfg.instances}
    rules = {name: rules_from_config(cfg.escalation, inst) for name, inst in instances.items()}
    reasons: collections.Counter[str] = collections.Counter()
    for _, m in day.messages:
        why = rules[m.instance].asks_for_human(m.text)
        if why:
            reasons[why] += 1
    assert sum(reasons.values()) >= 30
    assert any("أريد التحدث مع شخص" in r for r in reasons)
    assert any("hablar con" in r for r in reasons)
    assert any("falar com" in r or "atendente" in r for r in reasons)
    assert any(r in ("keyword: cancelar", "keyword: reclamação", "keyword: péssimo")
               for r in reasons), "loja's own keywords"
    responder = build_responder("rules", cfg.responders["rules"], None)
    answered = sum(not responder.reply_to(t).fallback for t in texts)  # type: ignore[attr-defined]
    assert 0.4 <= answered / len(texts) <= 0.85
