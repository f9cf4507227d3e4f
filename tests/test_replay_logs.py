"""Replays of real-world logs on event time: lines out of order, bad bodies, production
configs, CPU contention -- the outcomes depend on the log and the config only."""

from __future__ import annotations

import datetime as dt
import io
import json
import random
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from conftest import sql
from test_replay import config_on
from test_replay_http import CountingServer, serving

from pipeline.cli import bundled_day, sample_log
from pipeline.config import Config
from pipeline.intake import Intake
from pipeline.pgcluster import Cluster
from pipeline.replay import replay
from pipeline.store import InstanceRow, Store
from stages.parse import InstanceDirectory
from stages.records import Invalid, Outcome, RawEvent

DAY = bundled_day()


def day_lines() -> list[str]:
    return [line for line in DAY.read_text("utf-8").splitlines() if line.strip()]


def message_lines(lines: list[str]) -> list[int]:
    """Indexes of lines that carry a user message (text) and a good time."""
    found = []
    for n, text in enumerate(lines):
        try:
            record = json.loads(text)
            dt.datetime.fromisoformat(record["received_at"]).astimezone(dt.UTC)
        except (ValueError, KeyError, TypeError):
            continue
        if '"conversation"' in text or '"text": {"body"' in text:
            found.append(n)
    return found


def time_of(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(json.loads(text)["received_at"]).astimezone(dt.UTC)
    except (ValueError, KeyError, TypeError):
        return dt.datetime.min.replace(tzinfo=dt.UTC)  # a bad line: never swapped


def shifted(text: str, delta: dt.timedelta) -> str:
    record = json.loads(text)
    at = dt.datetime.fromisoformat(record["received_at"]) + delta
    record["received_at"] = at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(record, ensure_ascii=False)


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), "utf-8")
    return path


async def outcomes(cfg: Config, *logs: Path, **kwargs: Any) -> str:
    out = io.StringIO()
    await replay(cfg, list(logs), out=out, **kwargs)
    return out.getvalue()


def without_invalid(text: str) -> list[str]:
    return [line for line in text.splitlines() if '"action": "invalid"' not in line]


# --- lines out of order -----------------------------------------------------------------------


async def test_lines_far_ahead_do_not_move_time_for_the_others(cluster: Cluster,
                                                                tmp_path: Path) -> None:
    """The issue's log: three lines 1.5 h ahead of their neighbours. Without them the day
    replays to some outcomes; with them, the others' outcomes are the same to the byte and
    the three are reported with file:line and how far ahead they are."""
    cfg = config_on(cluster, tmp_path)
    lines = day_lines()
    picked = message_lines(lines)
    moved = [picked[len(picked) * k // 4] for k in (1, 2, 3)]
    ahead = [shifted(t, dt.timedelta(hours=1.5)) if n in moved else t
             for n, t in enumerate(lines)]
    removed = [t for n, t in enumerate(lines) if n not in moved]
    with_ahead = await outcomes(cfg, write_log(tmp_path / "ahead.jsonl", ahead))
    without = await outcomes(cfg, write_log(tmp_path / "removed.jsonl", removed))
    assert with_ahead.count('"action": "invalid"') == without.count('"action": "invalid"') + 3
    assert without_invalid(with_ahead) == without_invalid(without)
    seen: list[Outcome] = []
    await replay(cfg, [tmp_path / "ahead.jsonl"], on_pipeline=lambda p: p.sink.observers.append(
        lambda outcome, _: seen.append(outcome)))
    misplaced = [o for o in seen if o.reason and "reorder window" in o.reason]
    assert [o.origin for o in misplaced] == [f"{tmp_path / 'ahead.jsonl'}:{n + 1}"
                                             for n in moved]
    for o in misplaced:  # 1.5 h ahead of the line after it, give or take that line's gap
        assert re.match(r"received_at \S+ is 1:[23]\d:\d\d(\.\d+)? later than line \d+ after "
                        r"it, beyond the reorder window of 0:10:00: not replayed", o.reason or "")


async def test_shuffled_and_split_logs_give_the_same_outcomes(cluster: Cluster,
                                                               tmp_path: Path) -> None:
    """Lines displaced within the reorder window, and the day split into two files as if
    from two machines, replay exactly like the sorted day."""
    cfg = config_on(cluster, tmp_path)
    lines = day_lines()
    rng = random.Random(7)
    shuffled = lines[:]
    swaps = 0
    for i in range(0, len(shuffled) - 4, 3):  # local swaps: lines up to 5 minutes apart
        j = i + rng.randrange(1, 4)
        if abs(time_of(shuffled[i]) - time_of(shuffled[j])) < dt.timedelta(minutes=5):
            shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
            swaps += 1
    assert swaps > 500
    odd = [t for n, t in enumerate(lines) if n % 2]
    even = [t for n, t in enumerate(lines) if not n % 2]
    sorted_day = same_up_to_bad_lines(await outcomes(cfg, DAY))
    shuffled_day = await outcomes(cfg, write_log(tmp_path / "shuffled.jsonl", shuffled))
    assert same_up_to_bad_lines(shuffled_day) == sorted_day
    split = await outcomes(cfg, write_log(tmp_path / "odd.jsonl", odd),
                           write_log(tmp_path / "even.jsonl", even))
    assert same_up_to_bad_lines(split) == sorted_day


def same_up_to_bad_lines(text: str) -> tuple[list[str], list[str]]:
    """The lines of messages in order; the invalid ones (which have no time of their own
    and follow the line before them in their file) as a sorted list."""
    return without_invalid(text), sorted(set(text.splitlines()) - set(without_invalid(text)))


# --- bad lines ----------------------------------------------------------------------------------


def nine_events() -> list[str]:
    lines = [t for t in sample_log().read_text("utf-8").splitlines()
             if '"text"' in t and "messages" in t][:9]
    assert len(lines) == 9
    return lines


async def test_a_nul_line_is_invalid_on_its_own(cluster: Cluster, tmp_path: Path) -> None:
    """The issue's case: 9 events, one with a NUL in its text. The other 8 are answered."""
    lines = nine_events()
    clean = await outcomes(config_on(cluster, tmp_path),
                           write_log(tmp_path / "clean.jsonl", lines))
    bad = lines[:]
    bad[4] = bad[4].replace('"text": {"body": "', '"text": {"body": "\\u0000', 1)
    assert bad[4] != lines[4]
    result = await replay(config_on(cluster, tmp_path), [write_log(tmp_path / "nul.jsonl", bad)])
    assert result.events == 9
    assert result.sink.actions["invalid"] == 1
    assert result.sink.invalid == [f"{tmp_path / 'nul.jsonl'}:5: body holds a NUL character or "
                                   "a lone surrogate (\\u0000, \\ud800-\\udfff), which cannot "
                                   "be stored"]
    assert result.sink.total == len(clean.splitlines())


async def test_intake_stores_event_by_event_when_one_spoils_the_batch(store: Store,
                                                                      conninfo: str) -> None:
    """An event that reaches intake without the log's checks (a NUL in a body) and that the
    inbox refuses: the batch is stored event by event, only it becomes a dead letter."""
    await store.seed_instances([InstanceRow("demo", "1122334455667", "demo", {})])
    done_send, done_recv = trio.open_memory_channel[Outcome](100)
    intake = Intake(store, InstanceDirectory({"1122334455667": "demo"}, {}), done_send)
    at = dt.datetime(2025, 9, 1, 10, tzinfo=dt.UTC)

    def event(n: int, text: str) -> RawEvent:
        body = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
            "field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": {"display_phone_number": "1", "phone_number_id": "1122334455667"},
                "contacts": [{"profile": {"name": "A"}, "wa_id": f"55119{n:07d}"}],
                "messages": [{"from": f"55119{n:07d}", "id": f"wamid.{n}", "timestamp":
                              str(int(at.timestamp())), "type": "text",
                              "text": {"body": text}}]}}]}]}
        return RawEvent(at + dt.timedelta(seconds=n), "cloud-api", body, origin=f"log:{n}")

    batch: list[RawEvent | Invalid] = [event(n, "oi\x00" if n == 5 else f"oi {n}")
                                       for n in range(1, 10)]
    assert await intake(batch) == []
    rows = sql(conninfo, "SELECT message->>'message_id' FROM inbox ORDER BY id")
    assert [r[0] for r in rows] == [f"wamid.{n}" for n in range(1, 10) if n != 5]
    letters = sql(conninfo, "SELECT origin, reason FROM dead_letters")
    assert len(letters) == 1 and letters[0][0] == "log:5"
    assert "the inbox refused its 1 message(s)" in letters[0][1]
    (outcome,) = [done_recv.receive_nowait() for _ in range(1)]
    assert outcome.action == "invalid" and outcome.origin == "log:5"


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_byte_identical_in_every_context_mode_under_cpu_contention(
        cluster: Cluster, tmp_path: Path) -> None:
    """A day with lines out of order, a NUL line, redeliveries and repeats, replayed with a
    busy loop beside it: one outcomes file, whatever the mode or the run."""
    lines = day_lines()
    picked = message_lines(lines)
    lines[picked[10]] = shifted(lines[picked[10]], dt.timedelta(hours=2))
    # picked also holds receipts (their "conversation" object): the NUL goes in a text
    nul = next(n for n in picked[20:] if '"text": {"body": "' in lines[n])
    lines[nul] = lines[nul].replace('"body": "', '"body": "\\u0000', 1)
    for i in range(100, len(lines) - 3, 50):
        lines[i], lines[i + 2] = lines[i + 2], lines[i]
    log = write_log(tmp_path / "messy.jsonl", lines)
    files: dict[str, list[str]] = {}
    async with trio.open_nursery() as nursery:  # a busy loop takes a core for the whole test
        nursery.start_soon(partial(trio.run_process, [sys.executable, "-c", "while True: pass"]))
        for mode in ("claimed", "sequential", "parallel", "single", "batched", "claimed"):
            cfg = config_on(cluster, tmp_path, mode=f'"{mode}"', max_active_conversations=8)
            text = await outcomes(cfg, log)
            files.setdefault(text, []).append(mode)
        nursery.cancel_scope.cancel()
    assert len(files) == 1, [modes for modes in files.values()]
    (text,) = files
    assert '"redelivered message id"' in text and '"repeated text"' in text
    # the day's 18 bad lines, the NUL line and the line moved 2 h ahead
    assert text.count('"action": "invalid"') == 18 + 2
    assert text.count("body holds a NUL character") == 1


# --- safe by default ----------------------------------------------------------------------------


async def test_a_production_config_sends_nothing_unless_asked(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    async with serving(CountingServer()) as server:
        cfg = config_on(cluster, tmp_path)
        cfg = attrs.evolve(cfg, dispatch=attrs.evolve(
            cfg.dispatch, transport="evolution", base_url=server.url, max_attempts=1),
            instances=tuple(attrs.evolve(i, webhook_url=f"{server.url}/hook")
                            for i in cfg.instances))
        result = await replay(cfg, [sample_log()])
        assert server.posts == []
        assert result.not_sent_to[0] == f"evolution replies of demo to {server.url}"
        assert f"events of demo to {server.url}/hook" in result.not_sent_to
        assert result.sink.actions == {  # the sample on the default config
            "replied": 59, "escalated": 5, "held": 14, "merged": 9, "duplicate": 5,
            "ignored": 14, "invalid": 2}
        sent = await replay(cfg, [sample_log()], send=True)
        assert sent.not_sent_to == ()
        assert any(p.startswith("/message/sendText/") for p in server.posts)


def test_cli_says_what_it_did_not_send_and_refuses_send_with_compare(
        cluster: Cluster, tmp_path: Path) -> None:
    config_on(cluster, tmp_path)  # writes c.toml
    cfg_path = tmp_path / "prod.toml"
    src = (tmp_path / "c.toml").read_text()
    src = src.replace('transport = "dry"', 'transport = "evolution"').replace(
        'base_url = ""', 'base_url = "http://127.0.0.1:9"', 1)
    cfg_path.write_text(src)
    run = subprocess.run([sys.executable, "-m", "pipeline", "replay", "--config", str(cfg_path),
                          str(sample_log())], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "not sent (the dry transport; --send sends): evolution replies of demo to " \
           "http://127.0.0.1:9" in run.stdout
    assert "replaying with the dry transport: nothing is sent to" in run.stderr
    both = subprocess.run([sys.executable, "-m", "pipeline", "replay", "--config", str(cfg_path),
                           "--compare", str(cfg_path), "--send", str(sample_log())],
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 2
    assert "--send cannot be combined with --compare" in both.stderr


def test_reorder_window_option(cluster: Cluster, tmp_path: Path) -> None:
    """A line 20 min before lines already handed on: reported at the default window, put
    in its place with a wider one."""
    config_on(cluster, tmp_path)
    lines = [t for t in day_lines()[1000:1300] if time_of(t).year > 1]
    last = next(t for t in reversed(lines) if '"text": {"body"' in t)
    late = shifted(last, dt.timedelta(minutes=-20)).replace('"id": "wamid.', '"id": "wamid.L', 1)
    assert time_of(lines[-1]) - time_of(lines[0]) > dt.timedelta(minutes=30)
    log = write_log(tmp_path / "late.jsonl", [*lines, late])
    base = [sys.executable, "-m", "pipeline", "replay", "--config", str(tmp_path / "c.toml")]
    narrow = subprocess.run([*base, str(log)], capture_output=True, text=True, timeout=300)
    n = len(lines) + 1
    assert f"{log}:{n}: received_at " in narrow.stdout
    assert re.search(r"is 0:2\d:\d\d(\.\d+)? earlier than line \d+ before it, beyond the reorder "
                     "window of 0:10:00: not replayed", narrow.stdout), narrow.stdout
    wide = subprocess.run([*base, "--reorder-window", "3600", str(log)], capture_output=True,
                          text=True, timeout=300)
    assert "reorder window" not in wide.stdout + wide.stderr
    bad = subprocess.run([*base, "--reorder-window", "0", str(log)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("pipeline replay: --reorder-window must be a number of "
                                  "seconds > 0, not 0")
