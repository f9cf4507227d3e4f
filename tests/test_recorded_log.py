"""The recorded log: reading with bad lines, merging, writing back, daily rotation, the sample."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.recorded_log import (
    LogError,
    LogRecorder,
    format_log_line,
    merge_logs,
    read_log,
)
from stages.parse import InstanceDirectory, parse_event
from stages.records import InboundMessage, Invalid, RawEvent

SAMPLE = Path(__file__).parent.parent / "pipeline" / "data" / "sample.jsonl"


def line(received_at: str, body: Any = None, fmt: str = "cloud-api", **extra: Any) -> str:
    return json.dumps({"received_at": received_at, "format": fmt, "body": body or {}, **extra})


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    return path


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


# --- reading ------------------------------------------------------------------------------


def test_read_log_yields_events_in_file_order(tmp_path: Path) -> None:
    log = write(
        tmp_path / "a.jsonl",
        line("2025-08-31T10:15:02.123Z", {"n": 1}, headers={"content-type": "application/json"}),
        line("2025-08-31T12:15:03+02:00", {"n": 2}, fmt="evolution"),
    )
    first, second = read_log(log)
    assert first == RawEvent(
        received_at=when("2025-08-31T10:15:02.123+00:00"), format="cloud-api", body={"n": 1},
        headers={"content-type": "application/json"}, origin=f"{log}:1",
    )
    assert second == RawEvent(
        received_at=when("2025-08-31T10:15:03+00:00"), format="evolution", body={"n": 2},
        headers={}, origin=f"{log}:2",
    )
    assert second.received_at.tzinfo == dt.UTC


GOOD = line("2025-08-31T10:00:00.000Z")
BAD_LINES = [
    ("this is not json", r"line is not valid json: expecting value at column 1"),
    ('{"received_at": "2025-08-31T10:00:00Z",', r"line is not valid json: .* at column \d+"),
    ("[1, 2]", r"line must be a json object, not a list"),
    ('"text"', r"line must be a json object, not 'text'"),
    (json.dumps({"format": "cloud-api", "body": {}}), r"received_at is missing"),
    (line(5), r"received_at must be an iso-8601 time, not 5"),  # type: ignore[arg-type]
    (line("yesterday"), r"received_at must be an iso-8601 time, not 'yesterday'"),
    (json.dumps({"received_at": None, "format": "cloud-api", "body": {}}),
     r"received_at must be an iso-8601 time, not null"),
    (line("2025-08-31T10:00:00"),
     r"received_at must carry a time zone \(Z or an offset\), not '2025-08-31T10:00:00'"),
    (line("2025-08-31T10:00:00Z", fmt="telegram"),
     r"format must be 'cloud-api' or 'evolution', not 'telegram'"),
    (json.dumps({"received_at": "2025-08-31T10:00:00Z", "body": {}}),
     r"format must be 'cloud-api' or 'evolution', not null"),
    (json.dumps({"received_at": "2025-08-31T10:00:00Z", "format": "evolution"}),
     r"body is missing"),
    (line("2025-08-31T10:00:00Z", headers=["a"]),
     r"headers must be an object of strings, not a list"),
    (line("2025-08-31T10:00:00Z", headers={"x": 1}),
     r"headers must be an object of strings, not an object"),
    (line("2025-08-31T10:00:00Z", headers=None), r"headers must be an object of strings, not null"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_is_reported_and_reading_goes_on(tmp_path: Path, bad: str, reason: str) -> None:
    log = write(tmp_path / "x.jsonl", GOOD, bad, GOOD)
    first, error, third = read_log(log)
    assert isinstance(first, RawEvent)
    assert isinstance(third, RawEvent)
    assert third.origin == f"{log}:3"
    assert isinstance(error, LogError)
    assert (error.path, error.line) == (str(log), 2)
    assert re.fullmatch(reason, error.reason), error.reason
    assert str(error) == f"{log}:2: {error.reason}"


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    log = tmp_path / "b.jsonl"
    log.write_text(f"\n{GOOD}\n   \n\r\n{GOOD}\r\n", encoding="utf-8")
    assert [item.origin for item in read_log(log)] == [f"{log}:2", f"{log}:5"]  # type: ignore[union-attr]


def test_invalid_utf8_spoils_only_its_line(tmp_path: Path) -> None:
    log = tmp_path / "u.jsonl"
    broken = GOOD.replace("cloud-api", "cloud-\xe9pi").encode("latin-1")
    log.write_bytes(GOOD.encode() + b"\n" + broken + b"\n" + b"\xff\xfe\n" + GOOD.encode())
    items = list(read_log(log))
    assert [type(item).__name__ for item in items] == ["RawEvent", "LogError", "LogError",
                                                       "RawEvent"]
    at = broken.index(b"\xe9")
    assert str(items[1]) == f"{log}:2: line is not valid utf-8 at byte {at}"
    assert str(items[2]) == f"{log}:3: line is not valid utf-8 at byte 0"


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path: Path) -> None:
    body = {"text": "a\u2028b\u0085c"}
    log = write(tmp_path / "s.jsonl", json.dumps({"received_at": "2025-08-31T10:00:00Z",
                                                  "format": "cloud-api", "body": body},
                                                 ensure_ascii=False), GOOD)
    first, second = read_log(log)
    assert isinstance(first, RawEvent)
    assert first.body == body
    assert isinstance(second, RawEvent)


def test_overlong_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    log = write(tmp_path / "l.jsonl", GOOD, line("2025-08-31T10:00:00Z", {"pad": "x" * 500}), GOOD)
    items = list(read_log(log, max_line_bytes=200))
    assert [type(item).__name__ for item in items] == ["RawEvent", "LogError", "RawEvent"]
    assert str(items[1]) == f"{log}:2: line is longer than 200 bytes"
    assert items[2].origin == f"{log}:3"  # type: ignore[union-attr]


def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    log = tmp_path / "n.jsonl"
    log.write_text(GOOD, encoding="utf-8")
    assert len(list(read_log(log))) == 1


# --- merging ------------------------------------------------------------------------------


def labelled(path: Path, *items: tuple[str, str]) -> Path:
    """A log whose bodies are labels, so that an order can be read off the result."""
    return write(path, *(line(at, {"label": label}) for at, label in items))


def labels(items: list[RawEvent | LogError]) -> list[str]:
    return [item.body["label"] if isinstance(item, RawEvent) else f"error@{item.line}"
            for item in items]


def test_merge_orders_by_time_and_keeps_ties_stable(tmp_path: Path) -> None:
    a = labelled(tmp_path / "a.jsonl", ("2025-08-31T10:00:01Z", "a1"),
                 ("2025-08-31T10:00:03Z", "a2"), ("2025-08-31T10:00:03Z", "a3"))
    b = labelled(tmp_path / "b.jsonl", ("2025-08-31T10:00:00Z", "b1"),
                 ("2025-08-31T10:00:03Z", "b2"), ("2025-08-31T10:00:05Z", "b3"))
    c = labelled(tmp_path / "c.jsonl", ("2025-08-31T12:00:03+02:00", "c1"),
                 ("2025-08-31T10:00:04Z", "c2"))
    assert labels(list(merge_logs([a, b, c]))) == [
        "b1", "a1", "a2", "a3", "b2", "c1", "c2", "b3",
    ]
    assert labels(list(merge_logs([c, b, a]))) == [
        "b1", "a1", "c1", "b2", "a2", "a3", "c2", "b3",
    ]


def test_merge_yields_log_errors_where_they_are_met(tmp_path: Path) -> None:
    a = write(tmp_path / "a.jsonl", "oops", line("2025-08-31T10:00:02Z", {"label": "a1"}),
              "[]", line("2025-08-31T10:00:09Z", {"label": "a2"}))
    b = labelled(tmp_path / "b.jsonl", ("2025-08-31T10:00:01Z", "b1"),
                 ("2025-08-31T10:00:03Z", "b2"))
    merged = list(merge_logs([a, b]))
    assert labels(merged) == ["error@1", "b1", "a1", "error@3", "b2", "a2"]
    assert merged[0] == LogError(str(a), 1, "line is not valid json: expecting value at column 1")


def minutes_log(path: Path, *minutes: float) -> Path:
    """A log whose line n is received ``minutes[n-1]`` minutes after 10:00, labelled so."""
    base = dt.datetime(2025, 8, 31, 10, tzinfo=dt.UTC)
    return labelled(path, *(((base + dt.timedelta(minutes=m)).isoformat(), f"{m:g}")
                            for m in minutes))


def replayed(log: Path, window_min: float = 10) -> tuple[list[str], list[str]]:
    """The labels in the order merged, and the reasons of the lines left out."""
    items = list(merge_logs([log], dt.timedelta(minutes=window_min)))
    return ([i.body["label"] for i in items if isinstance(i, RawEvent)],
            [f"{i.line}: {i.reason}" for i in items if isinstance(i, LogError)])


STEADY = list(range(30))


@pytest.mark.parametrize(("minutes", "order", "left_out"), [
    pytest.param(STEADY, STEADY, [], id="in order"),
    pytest.param([0, 5, 3, 6, 4, 9, 8], [0, 3, 4, 5, 6, 8, 9], [], id="within the window"),
    pytest.param([*STEADY[:15], 105, *STEADY[16:]], [*STEADY[:15], *STEADY[16:]],
                 ["16: received_at 2025-08-31T11:45:00Z is 1:29:00 later than line 17 after "
                  "it, beyond the reorder window of 0:10:00: not replayed"],
                 id="one line 1.5 h ahead"),
    pytest.param([*STEADY[:10], 100, 101, 102, *STEADY[10:]], STEADY,
                 ["11: ", "12: ", "13: "], id="three lines ahead together"),
    pytest.param([100, *STEADY], STEADY, ["1: "], id="the first line ahead"),
    pytest.param([0, 1, 2, *range(600, 612)], [0, 1, 2, *range(600, 612)], [],
                 id="a quiet night is a real jump"),
    pytest.param([0, 1, 2, 100], [0, 1, 2, 100], [], id="a jump at the end of the input"),
    pytest.param([*STEADY, 3], STEADY,
                 ["31: received_at 2025-08-31T10:03:00Z is 0:26:00 earlier than line 30 "
                  "before it, beyond the reorder window of 0:10:00: not replayed"],
                 id="a line 26 min late"),
    pytest.param([0, 1, 20, 2, 3], [0, 1, 2, 3], ["3: "], id="a jump of one line"),
])
def test_lines_are_put_back_in_time_order_within_the_window(
        tmp_path: Path, minutes: list[float], order: list[float], left_out: list[str]) -> None:
    got, errors = replayed(minutes_log(tmp_path / "a.jsonl", *minutes))
    assert got == [f"{m:g}" for m in order]
    assert len(errors) == len(left_out)
    for error, expected in zip(errors, left_out, strict=True):
        assert error.startswith(expected)
        assert "(a wider --reorder-window puts it in place)" in error


def test_a_wider_window_puts_a_late_line_in_place(tmp_path: Path) -> None:
    log = minutes_log(tmp_path / "a.jsonl", *STEADY, 3)
    assert replayed(log, window_min=30) == ([f"{m:g}" for m in sorted([*STEADY, 3])], [])


def test_unreadable_lines_keep_their_place_after_reordering(tmp_path: Path) -> None:
    log = write(tmp_path / "a.jsonl", line("2025-08-31T10:00:05Z", {"label": "a"}), "oops",
                line("2025-08-31T10:00:01Z", {"label": "b"}))
    assert labels(list(merge_logs([log]))) == ["b", "a", "error@2"]


def test_merge_is_lazy(tmp_path: Path) -> None:
    a = labelled(tmp_path / "a.jsonl", ("2025-08-31T10:00:00Z", "a1"))
    merged = merge_logs([a, tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError):
        next(merged)  # files are opened on first use, not on the call


# --- writing ------------------------------------------------------------------------------

#: what a webhook body may hold (no NUL, no lone surrogate, no infinity: see check_body)
storable = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | storable,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(storable.filter(lambda t: len(t) <= 6), children, max_size=4),
    max_leaves=20,
)
moments = st.datetimes(
    min_value=dt.datetime(2, 1, 2), max_value=dt.datetime(9990, 12, 30),
    timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-3))]),
).map(lambda moment: moment.replace(microsecond=moment.microsecond // 1000 * 1000))


@settings(max_examples=200, deadline=None)
@given(
    received_at=moments,
    fmt=st.sampled_from(["cloud-api", "evolution"]),
    body=json_like,
    headers=st.dictionaries(storable.filter(lambda t: len(t) <= 8),
                            storable.filter(lambda t: len(t) <= 8),
                            max_size=3),
)
def test_format_log_line_round_trips(
    tmp_path_factory: pytest.TempPathFactory, received_at: dt.datetime, fmt: str, body: Any,
    headers: dict[str, str],
) -> None:
    event = RawEvent(received_at=received_at, format=fmt, body=body, headers=headers)  # type: ignore[arg-type]
    text = format_log_line(event)
    assert "\n" not in text
    log = write(tmp_path_factory.mktemp("rt") / "r.jsonl", text)
    (back,) = read_log(log)
    assert back == RawEvent(received_at=received_at, format=fmt, body=body,  # type: ignore[arg-type]
                            headers=headers, origin=f"{log}:1")


def test_format_log_line_shape() -> None:
    event = RawEvent(received_at=dt.datetime(2025, 8, 31, 7, 15, 2, 123456,
                                             tzinfo=dt.timezone(dt.timedelta(hours=-3))),
                     format="evolution", body={"text": "olá"})
    assert format_log_line(event) == (
        '{"received_at": "2025-08-31T10:15:02.123Z", "format": "evolution", '
        '"body": {"text": "olá"}}'
    )


def test_format_log_line_keeps_lone_surrogates_escaped(tmp_path: Path) -> None:
    """Such a body cannot be stored (a webhook refuses it): written escaped, it is read back
    as a bad line of its own, never taking its neighbours along."""
    event = RawEvent(received_at=dt.datetime(2025, 8, 31, tzinfo=dt.UTC), format="cloud-api",
                     body={"text": "\ud800"})
    text = format_log_line(event)
    assert "\\ud800" in text
    good = line("2025-08-31T10:00:00Z", {"label": "ok"})
    before, back, after = read_log(write(tmp_path / "s.jsonl", good, text, good))
    assert isinstance(before, RawEvent) and isinstance(after, RawEvent)
    assert back == LogError(str(tmp_path / "s.jsonl"), 2, "body holds a NUL character or a "
                            "lone surrogate (\\u0000, \\ud800-\\udfff), which cannot be stored")


@pytest.mark.parametrize(("body", "reason"), [
    ({"text": "a\x00b"}, "body holds a NUL character"),
    ({"n": float("inf")}, "body holds a number too large"),
    ({"a": json.loads("[" * 40 + "]" * 40)}, "body is nested deeper than 32 levels"),
])
def test_log_bodies_get_the_checks_of_webhook_bodies(tmp_path: Path, body: Any,
                                                     reason: str) -> None:
    log = tmp_path / "b.jsonl"
    log.write_text(json.dumps({"received_at": "2025-08-31T10:00:00Z", "format": "cloud-api",
                               "body": body}) + "\n")
    (item,) = read_log(log)
    assert isinstance(item, LogError) and item.reason.startswith(reason)


def event_at(text: str, label: str) -> RawEvent:
    return RawEvent(received_at=when(text), format="cloud-api", body={"label": label})


def test_recorder_rotates_daily_by_utc_date(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    with LogRecorder(folder) as recorder:
        recorder.write(event_at("2025-08-31T23:59:59.999+00:00", "a"))
        assert recorder.path == folder / "intake-2025-08-31.jsonl"
        recorder.write(event_at("2025-08-31T21:00:00-03:00", "b"))  # 00:00 UTC next day
        assert recorder.path == folder / "intake-2025-09-01.jsonl"
        recorder.write(event_at("2025-09-01T00:00:01+00:00", "c"))
        recorder.write(event_at("2025-08-31T23:59:59.999+00:00", "late"))
    assert recorder.path is None
    assert sorted(p.name for p in folder.iterdir()) == [
        "intake-2025-08-31.jsonl", "intake-2025-09-01.jsonl",
    ]
    assert labels(list(read_log(folder / "intake-2025-08-31.jsonl"))) == ["a", "late"]
    assert labels(list(read_log(folder / "intake-2025-09-01.jsonl"))) == ["b", "c"]


def test_recorder_flushes_each_line_and_appends(tmp_path: Path) -> None:
    recorder = LogRecorder(tmp_path)
    recorder.write(event_at("2025-08-31T10:00:00+00:00", "a"))
    path = tmp_path / "intake-2025-08-31.jsonl"
    assert labels(list(read_log(path))) == ["a"]  # visible before close
    recorder.close()
    recorder.write(event_at("2025-08-31T10:00:01+00:00", "b"))
    recorder.close()
    assert labels(list(read_log(path))) == ["a", "b"]


def test_recorder_does_not_glue_onto_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "intake-2025-08-31.jsonl"
    path.write_text(GOOD + '\n{"received_at": "2025-08-', encoding="utf-8")
    with LogRecorder(tmp_path) as recorder:
        recorder.write(event_at("2025-08-31T10:00:01+00:00", "b"))
    items = list(read_log(path))
    assert [type(item).__name__ for item in items] == ["RawEvent", "LogError", "RawEvent"]
    assert labels(items[2:]) == ["b"]


# --- the bundled sample -------------------------------------------------------------------


def test_sample_log_reads_and_parses() -> None:
    items = list(read_log(SAMPLE))
    errors = [item for item in items if isinstance(item, LogError)]
    events = [item for item in items if isinstance(item, RawEvent)]
    assert len(errors) == 1
    assert errors[0].reason.startswith("line is not valid json")
    assert 60 <= len(items) <= 120
    times = [event.received_at for event in events]
    assert times == sorted(times)
    assert times[-1] - times[0] <= dt.timedelta(minutes=10)
    assert {t.date() for t in times} == {dt.date(2025, 8, 31)}

    directory = InstanceDirectory({"1122334455667": "demo"}, {"loja": "loja"})
    results = [result for event in events for result in parse_event(event, directory)]
    invalid = [r for r in results if isinstance(r, Invalid)]
    assert len(invalid) == 1  # the deliberate unknown-shape body
    messages = [r for r in results if isinstance(r, InboundMessage)]
    assert {m.instance for m in messages} == {"demo", "loja"}
    assert 12 <= len({m.conversation_key for m in messages}) <= 18
    redelivered = [mid for mid, n in Counter(m.message_id for m in messages).items() if n > 1]
    assert 2 <= len(redelivered) <= 5
    kinds = Counter(m.kind for m in messages)
    assert {"image", "interactive", "reaction"} <= set(kinds)
    assert kinds["text"] >= 0.8 * len(messages)
    reasons = {r.reason for r in results if not isinstance(r, InboundMessage | Invalid)}
    assert {"own message (fromMe)", "receipt: delivered", "receipt: read"} <= reasons
