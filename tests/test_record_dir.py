"""A ``record_dir`` that cannot be written never costs a message: the recorder says clearly
which path is wrong and why, and the webhook logs it (once, not per request), counts it, hands
the stored message over and answers 200. Real files: a path under a regular file (ENOTDIR)
and a log file that is ``/dev/full`` (ENOSPC, a full disk) -- no mocks."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from conftest import sql
from loguru import logger
from test_webhook import DIRECTORY, SECRET, Server, _start, cloud_body, signed

from pipeline.config import WebhookConfig
from pipeline.intake import LiveIntake, SharedWrites
from pipeline.metrics import Metrics, StageMetrics, summary_table
from pipeline.recorded_log import LogRecorder, RecordDirError, read_log
from pipeline.store import Store
from pipeline.webhook import RECORD_WARN_EVERY_S, WebhookApp
from stages.intake import Accepted
from stages.records import RawEvent

DAY = dt.datetime(2025, 8, 31, 10, 15, 2, tzinfo=dt.UTC)


def event(text: str = "hi") -> RawEvent:
    return RawEvent(DAY, "cloud-api", {"text": text})


def full_disk(folder: Path) -> Path:
    """A record_dir whose log of ``DAY`` is ``/dev/full``: every write fails with ENOSPC."""
    folder.mkdir()
    (folder / "intake-2025-08-31.jsonl").symlink_to("/dev/full")
    return folder


# --- the recorder names the bad path and the reason ---------------------------------------------


def test_a_record_dir_under_a_regular_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    recorder = LogRecorder(tmp_path / "file" / "rec")
    expected = (rf"^record_dir {re.escape(str(tmp_path / 'file' / 'rec'))} cannot be created: "
                rf"{re.escape(str(tmp_path / 'file'))} is not a directory$")
    with pytest.raises(RecordDirError, match=expected):
        recorder.check()
    with pytest.raises(RecordDirError, match=expected):
        recorder.write(event())
    assert isinstance(RecordDirError("x"), OSError)  # the webhook catches OSError


def test_a_record_dir_that_is_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "rec").write_text("not a folder")
    with pytest.raises(RecordDirError,
                       match=rf"^record_dir {re.escape(str(tmp_path / 'rec'))} is not a "
                             r"directory$"):
        LogRecorder(tmp_path / "rec").write(event())


def test_a_full_disk_is_reported_and_the_next_write_starts_a_clean_line(tmp_path: Path) -> None:
    folder = full_disk(tmp_path / "rec")
    log = folder / "intake-2025-08-31.jsonl"
    with LogRecorder(folder) as recorder:
        with pytest.raises(RecordDirError, match=rf"^cannot append to {re.escape(str(log))}: "
                                                 r"no space left on device$"):
            recorder.write(event("lost"))
        log.unlink()  # space again (a regular file in its place)
        log.write_text('{"received_at": "2025-08-31T10:15:02.000Z", "format": "clou')  # cut
        recorder.write(event("kept"))
    items = list(read_log(log))
    assert [type(i).__name__ for i in items] == ["LogError", "RawEvent"]
    assert isinstance(items[1], RawEvent) and items[1].body == {"text": "kept"}


def test_check_accepts_a_good_record_dir_and_creates_it(tmp_path: Path) -> None:
    LogRecorder(tmp_path / "a" / "b").check()
    assert (tmp_path / "a" / "b").is_dir()


# --- the webhook: logged once, counted, handed over, 200 ----------------------------------------


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="WARNING",
                      format="{level} {message}")
    yield lines
    logger.remove(sink)


@asynccontextmanager
async def _server_with(store: Store, recorder: LogRecorder) -> AsyncIterator[Server]:
    cfg = WebhookConfig(port=0, app_secret=SECRET)
    async with trio.open_nursery() as nursery:
        yield await _start(nursery, store, cfg, recorder)
        nursery.cancel_scope.cancel()


async def _post_three(server: Server) -> list[httpx.Response]:
    responses = []
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(3):
            raw = cloud_body(f"wamid.R{n}", f"text {n}")
            responses.append(await client.post(f"{server.url}/webhook/cloud-api", content=raw,
                                               headers=signed(raw)))
    return responses


@pytest.mark.parametrize("bad", ["under a file", "full disk"])
async def test_a_record_dir_error_is_logged_once_counted_and_the_message_goes_on(
    store: Store, conninfo: str, tmp_path: Path, warnings: list[str], bad: str,
) -> None:
    if bad == "under a file":
        (tmp_path / "file").write_text("not a folder")
        folder = tmp_path / "file" / "rec"
        reason = "is not a directory"
    else:  # the webhook stamps the real date: make today's log the full device
        folder = tmp_path / "rec"
        folder.mkdir()
        today = dt.datetime.now(dt.UTC).date().isoformat()
        (folder / f"intake-{today}.jsonl").symlink_to("/dev/full")
        reason = "no space left on device"
    with LogRecorder(folder) as recorder:
        async with _server_with(store, recorder) as server:
            responses = await _post_three(server)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert [r.json()["stored"] for r in responses] == [1, 1, 1]
            assert [s.message.text for a in server.accepted for s in a.stored] == [
                "text 0", "text 1", "text 2"]  # every message handed over
            assert server.app.stats.counters["record_dir errors"] == 3
            assert server.app.stats.errors == 0
    assert sql(conninfo, "SELECT count(*) FROM inbox") == [(3,)]
    mine = [w for w in warnings if "record_dir" in w or "cannot append" in w]
    assert len(mine) == 1, warnings  # once, not once per request
    assert re.match(rf"^WARNING cannot record intake \(the message is stored and goes on\): "
                    rf".*{reason} \[1 record_dir errors so far\]$", mine[0])


def test_the_summary_shows_a_stage_counter() -> None:
    metrics = Metrics()
    stage: StageMetrics = metrics.stage("webhook")
    stage.counters["record_dir errors"] += 2
    assert summary_table(metrics, 0).splitlines()[-1] == "webhook: record_dir errors=2"
    assert metrics.snapshot()["stages"]["webhook"]["counters"] == {"record_dir errors": 2}


async def test_a_lasting_record_dir_error_is_logged_again_only_after_a_while(
    store: Store, tmp_path: Path, warnings: list[str], autojump_clock: trio.testing.MockClock,
) -> None:
    (tmp_path / "file").write_text("not a folder")
    bad, full = LogRecorder(tmp_path / "file" / "rec"), LogRecorder(full_disk(tmp_path / "rec"))
    app = WebhookApp(WebhookConfig(), LiveIntake(store, DIRECTORY, SharedWrites(store)),
                     _nothing,
                     Metrics().stage("webhook"))
    infos: list[str] = []
    sink = logger.add(lambda m: infos.append(str(m).rstrip("\n")), level="INFO",
                      filter=lambda r: r["level"].name == "INFO", format="{message}")
    start = trio.current_time()
    for at, recorder in [(0, bad), (30, bad), (RECORD_WARN_EVERY_S + 1, bad),
                         (RECORD_WARN_EVERY_S + 2, full), (RECORD_WARN_EVERY_S + 3, bad)]:
        await trio.sleep(start + at - trio.current_time())
        app._record(recorder, event())
    app._record(LogRecorder(tmp_path / "good"), event())
    logger.remove(sink)
    assert [re.sub(r"^.* (?=not a dir|no space)", "", w) for w in warnings] == [
        "not a directory [1 record_dir errors so far]",
        "not a directory [3 record_dir errors so far]",  # the same reason, a minute later
        "no space left on device [4 record_dir errors so far]",  # another reason: at once
        "not a directory [5 record_dir errors so far]",
    ]
    assert infos == ["record_dir is written again"]
    assert app.stats.counters["record_dir errors"] == 5


async def _nothing(_accepted: Accepted) -> None:
    pass
