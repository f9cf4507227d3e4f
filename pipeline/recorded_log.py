"""The recorded message log: JSONL, one raw webhook event a line (DESIGN.md).

``{"received_at": "2025-08-31T10:15:02.123Z", "format": "cloud-api", "headers": {...},
"body": {...}}`` — ``headers`` optional, ``body`` exactly as received. Replays read it with
:func:`read_log` / :func:`merge_logs`; ``pipeline run`` writes it with :class:`LogRecorder`.

A bad line never stops a replay: it becomes a :class:`LogError` naming ``file:line`` and the
reading goes on. Files are read as bytes and decoded line by line, so one line of broken
UTF-8 spoils only itself. Only the envelope is checked here; the body's shape is the
parser's business (an odd body becomes an ``Invalid`` there, with a path into the body).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Self

import attrs

from stages.parse import BodyError, check_body
from stages.records import FORMATS, RawEvent

__all__ = ["MAX_LINE_BYTES", "REORDER_WINDOW", "LogError", "LogRecorder", "RecordDirError",
           "format_log_line", "merge_logs", "read_log", "reorder"]

#: a longer line is reported and skipped instead of being held in memory whole
MAX_LINE_BYTES = 16 * 1024 * 1024
#: a body nested deeper is a bad line (the default ``[webhook] max_json_depth``)
MAX_JSON_DEPTH = 32

StrPath = str | os.PathLike[str]


@attrs.frozen
class LogError:
    """A line of a log that could not be read; the replay reports it and carries on."""

    path: str
    line: int
    reason: str
    #: the time it is placed at: that of the line before it (set when merged)
    at: dt.datetime | None = attrs.field(default=None, eq=False)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class _BadLine(Exception):
    """Why one line is unreadable; turned into a LogError by the reader."""


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value) if isinstance(value, bool) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- reading ------------------------------------------------------------------------------


def read_log(
    path: StrPath, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[RawEvent | LogError]:
    """Yield the events of one log in file order, and a LogError for each bad line.

    Blank lines are skipped silently. Each event's ``origin`` is ``"path:line"``. A file
    that cannot be opened raises ``OSError`` (that is not a bad line, it is a bad command).
    """
    name = os.fspath(path)
    with open(path, "rb") as file:
        for number, raw in enumerate(_lines(file, max_line_bytes), start=1):
            if raw is None:
                yield LogError(name, number, f"line is longer than {max_line_bytes} bytes")
            elif raw.strip():
                yield _read_line(raw, name, number)


def _lines(file: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """Physical lines, with ``None`` in place of a line longer than ``limit`` bytes."""
    while line := file.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):  # skip the rest of the long line
            line = file.readline(limit + 1)
        yield None


def _read_line(raw: bytes, name: str, number: int) -> RawEvent | LogError:
    try:
        return _event_from_line(raw, f"{name}:{number}")
    except _BadLine as problem:
        return LogError(name, number, str(problem))


def _event_from_line(raw: bytes, origin: str) -> RawEvent:
    record = _json_object(raw)
    if "received_at" not in record:
        raise _BadLine("received_at is missing")
    received_at = _received_at(record["received_at"])
    log_format = record.get("format")
    if log_format not in FORMATS:
        raise _BadLine(f"format must be 'cloud-api' or 'evolution', not {_kind_of(log_format)}")
    if "body" not in record:
        raise _BadLine("body is missing")
    try:
        check_body(record["body"], MAX_JSON_DEPTH)  # what a webhook body must pass too
    except BodyError as exc:
        raise _BadLine(exc.reason) from exc
    headers = _headers(record.get("headers", {}))
    return RawEvent(received_at=received_at, format=log_format, body=record["body"],
                    headers=headers, origin=origin)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadLine(f"line is not valid utf-8 at byte {exc.start}") from exc
    try:
        record = json.loads(text)
    except RecursionError as exc:
        raise _BadLine("line is nested too deeply") from exc
    except json.JSONDecodeError as exc:
        message = exc.msg.lower().removesuffix(" at")  # some messages end in "at" already
        raise _BadLine(f"line is not valid json: {message} at column {exc.colno}") from exc
    except ValueError as exc:  # e.g. an integer with too many digits
        raise _BadLine(f"line is not valid json: {str(exc).lower()}") from exc
    if not isinstance(record, dict):
        raise _BadLine(f"line must be a json object, not {_kind_of(record)}")
    return record


MIN_YEAR, MAX_YEAR = 2, 9990


def _received_at(value: Any) -> dt.datetime:
    """An ISO-8601 time with ``Z`` or an offset: a naive time would be a guess."""
    try:
        moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None:
        raise _BadLine(f"received_at must be an iso-8601 time, not {_kind_of(value)}")
    if moment.tzinfo is None:
        raise _BadLine(f"received_at must carry a time zone (Z or an offset), not {value!r}")
    try:
        utc = moment.astimezone(dt.UTC)
    except OverflowError:
        utc = None
    if utc is None or not MIN_YEAR <= utc.year <= MAX_YEAR:  # room for windows either side
        raise _BadLine(f"received_at must be between the years {MIN_YEAR} and {MAX_YEAR}, "
                       f"not {value!r}")
    return moment


def _headers(value: Any) -> dict[str, str]:
    if isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
        try:
            check_body(value, 1)
        except BodyError as exc:
            raise _BadLine("headers hold a NUL character or a lone surrogate") from exc
        return value
    raise _BadLine(f"headers must be an object of strings, not {_kind_of(value)}")


# --- putting lines back in time order -----------------------------------------------------

_BEGINNING = dt.datetime.min.replace(tzinfo=dt.UTC)

#: how far a line may be out of time order and still be put back in its place
REORDER_WINDOW = dt.timedelta(minutes=10)
#: a jump forward by more than the window counts as real (a quiet night, say) once this many
#: lines after it agree with it; if an earlier line comes back first, the jump is misplaced
CONFIRM_LINES = 8

Item = RawEvent | LogError


def _place(event: RawEvent) -> tuple[str, int]:
    path, _, number = event.origin.rpartition(":")
    return path, int(number) if number.isdigit() else 0


def _span(delta: dt.timedelta) -> str:
    """``1:30:00``, ``0:00:02.5``: a duration as a person reads it."""
    seconds = round(delta.total_seconds(), 3)
    whole = int(seconds)
    text = str(dt.timedelta(seconds=whole))
    return text + (f"{seconds - whole:.3f}".lstrip("0").rstrip("0") if seconds != whole else "")


@attrs.define
class _Reorder:
    """The state of :func:`reorder` over one file (see there)."""

    window: dt.timedelta
    heap: list[tuple[dt.datetime, int, Item]] = attrs.field(factory=list)
    seq: int = 0
    top: RawEvent | None = None  # the latest event accepted
    prev: dt.datetime = _BEGINNING  # time of the last event accepted, in file order
    frontier: dt.datetime = _BEGINNING  # time of the last item handed on
    jump: list[Item] = attrs.field(factory=list)  # lines of an unconfirmed jump forward

    def push(self, key: dt.datetime, item: Item) -> None:
        heapq.heappush(self.heap, (key, self.seq, item))
        self.seq += 1

    def feed(self, item: Item) -> list[Item]:
        """Take one item; returns items to feed again (those after a confirmed jump's
        first line)."""
        if isinstance(item, LogError):  # keeps its place after the line before it
            if self.jump:
                self.jump.append(item)
            else:
                self.push(max(self.prev, self.frontier), item)
            return []
        t = item.received_at
        if self.jump:
            start = self.jump[0]
            assert isinstance(start, RawEvent)
            if t >= start.received_at - self.window:
                self.jump.append(item)
                return self.confirm() if len(self.jump) >= CONFIRM_LINES else []
            for misplaced in self.jump:  # an earlier line came back: the jump was misplaced
                if isinstance(misplaced, LogError):
                    self.push(max(self.prev, self.frontier), misplaced)
                else:
                    self._reject(misplaced, f"is {_span(misplaced.received_at - t)} later "
                                 f"than line {_place(item)[1]} after it")
            self.jump = []
        if self.top is None or t > self.top.received_at + self.window:
            self.jump = [item]
            return []
        if t < self.frontier:
            self._reject(item, f"is {_span(self.top.received_at - t)} earlier than line "
                         f"{_place(self.top)[1]} before it")
            return []
        self._accept(item)
        return []

    def _accept(self, event: RawEvent) -> None:
        self.push(event.received_at, event)
        self.prev = event.received_at
        if self.top is None or event.received_at > self.top.received_at:
            self.top = event

    def take(self, items: list[Item]) -> None:
        while items:
            items = self.feed(items[0]) + items[1:]

    def confirm(self) -> list[Item]:
        """The jump is real: accept its first line; the rest are fed again."""
        first, *rest = self.jump
        assert isinstance(first, RawEvent)
        self.jump = []
        self._accept(first)
        return rest

    def _reject(self, event: RawEvent, how: str) -> None:
        path, number = _place(event)
        at = event.received_at.isoformat().replace("+00:00", "Z")
        self.push(max(self.prev, self.frontier), LogError(
            path, number, f"received_at {at} {how}, beyond the reorder window of "
            f"{_span(self.window)}: not replayed (a wider --reorder-window puts it in place)"))

    def ready(self, final: bool = False) -> Iterator[tuple[dt.datetime, Item]]:
        """What can be handed on: everything older than the window (all, once ``final``)."""
        limit = None if final or self.top is None else self.top.received_at - self.window
        while self.heap and (limit is None or self.heap[0][0] <= limit):
            key, _, item = heapq.heappop(self.heap)
            self.frontier = max(self.frontier, key)
            yield self.frontier, item


def reorder(items: Iterable[Item], window: dt.timedelta = REORDER_WINDOW
            ) -> Iterator[tuple[dt.datetime, Item]]:
    """One file's items in ``received_at`` order, each with the time it is sorted by.

    A line out of order by at most ``window`` of recorded time is put back in its place
    (memory: the lines of one window). A line later than what was already handed on by more
    than that is a :class:`LogError`. A line that jumps forward by more than the window is
    held until :data:`CONFIRM_LINES` lines agree with it (a real gap, such as a night); if an
    earlier line comes first, the jump's lines are errors: a few misplaced lines never move
    the time of the others. Unreadable lines keep their place after the line before them.
    """
    if window <= dt.timedelta(0):
        raise ValueError(f"the reorder window must be positive, not {window}")
    state = _Reorder(window)
    for item in items:
        state.take([item])
        yield from state.ready()
    while state.jump:  # nothing contradicted it: the input simply ended
        state.take(state.confirm())
    yield from state.ready(final=True)


def merge_logs(paths: Iterable[StrPath], window: dt.timedelta = REORDER_WINDOW
               ) -> Iterator[RawEvent | LogError]:
    """Yield the events of several logs merged by ``received_at``, streaming.

    Each file is put in order first (:func:`reorder`, within ``window``); ``heapq.merge`` then
    holds one item per file. Ties keep the order of ``paths``, then line order. A LogError
    (an unreadable or misplaced line) comes out right after the event that preceded it.
    """
    streams = [reorder(read_log(path), window) for path in paths]
    for at, item in heapq.merge(*streams, key=lambda pair: pair[0]):
        yield attrs.evolve(item, at=at) if isinstance(item, LogError) else item


# --- writing ------------------------------------------------------------------------------


def _iso_ms(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds") + "Z"


def format_log_line(event: RawEvent) -> str:
    """One log line (without its newline) that :func:`read_log` reads back as ``event``.

    ``received_at`` is written in UTC to the millisecond (finer digits are dropped), and
    ``origin`` is not written: the reader derives it from the file position.
    """
    record: dict[str, Any] = {"received_at": _iso_ms(event.received_at), "format": event.format}
    if event.headers:
        record["headers"] = event.headers
    record["body"] = event.body
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: keep it escaped
        line = json.dumps(record, ensure_ascii=True)
    return line


class RecordDirError(OSError):
    """The recorder cannot write: the message names the path and why (``record_dir /x is not
    a directory``, ``cannot append to /x/intake-2025-08-31.jsonl: no space left on device``).
    An ``OSError``, so a caller that guards the file I/O catches it as such."""


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _not_a_directory(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a directory."""
    for candidate in (*reversed(path.parents), path):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


class LogRecorder:
    """Append live intake to ``DIR/intake-YYYY-MM-DD.jsonl``, one file per UTC day.

    Sync file I/O, flushed after every line so that a crash loses at most the line being
    written; run it in a thread if its cost matters. The file is chosen by each event's
    ``received_at`` date, so a late event from yesterday goes to yesterday's file.

    Every I/O failure is a :class:`RecordDirError` that names the path and the reason. After
    a failed write the file is closed, so the next write reopens it and starts a fresh line
    (whatever part of the failed line reached the disk is then one unreadable line).
    """

    def __init__(self, directory: StrPath) -> None:
        self._directory = Path(directory)
        self._day: dt.date | None = None
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path | None:
        """The file being written, if any."""
        return None if self._day is None else self._path_for(self._day)

    def _path_for(self, day: dt.date) -> Path:
        return self._directory / f"intake-{day.isoformat()}.jsonl"

    def check(self) -> None:
        """Create the directory if needed and make sure a file can be created in it; raise
        :class:`RecordDirError` otherwise (for a clear message at start, before traffic)."""
        self._make_directory()
        probe = self._directory / f".write-check-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise RecordDirError(
                f"record_dir {self._directory} is not writable: {_reason(exc)}") from exc

    def write(self, event: RawEvent) -> None:
        """Append one event, opening the file of its day first if needed."""
        day = event.received_at.astimezone(dt.UTC).date()
        if self._file is None or day != self._day:
            self._open(day)
        assert self._file is not None
        try:
            self._file.write(format_log_line(event).encode("utf-8") + b"\n")
            self._file.flush()
        except OSError as exc:
            path = self.path
            self._drop()
            raise RecordDirError(f"cannot append to {path}: {_reason(exc)}") from exc

    def _make_directory(self) -> None:
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            blocker = _not_a_directory(self._directory)
            if blocker == self._directory:
                raise RecordDirError(f"record_dir {blocker} is not a directory") from exc
            why = f"{blocker} is not a directory" if blocker else _reason(exc)
            raise RecordDirError(f"record_dir {self._directory} cannot be created: {why}") \
                from exc

    def _open(self, day: dt.date) -> None:
        self.close()
        self._make_directory()
        path = self._path_for(day)
        try:
            file = open(path, "a+b")  # noqa: SIM115 (held across writes)
        except OSError as exc:
            raise RecordDirError(f"cannot open {path} for appending: {_reason(exc)}") from exc
        try:
            if file.seek(0, os.SEEK_END) > 0:
                file.seek(-1, os.SEEK_END)
                if file.read(1) != b"\n":  # a crash cut the last line: do not glue onto it
                    file.write(b"\n")
        except OSError as exc:
            file.close()
            raise RecordDirError(f"cannot append to {path}: {_reason(exc)}") from exc
        self._file, self._day = file, day

    def _drop(self) -> None:
        """Close the current file after a failed write; its unwritten bytes are lost."""
        file, self._file, self._day = self._file, None, None
        if file is not None:
            with contextlib.suppress(OSError):  # it flushes again, which may fail the same way
                file.close()  # but it closes the file anyway

    def close(self) -> None:
        """Close the current file; a later write opens it again."""
        if self._file is not None:
            self._file.close()
        self._file, self._day = None, None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
