"""Deterministic replay: byte-identical outcome files on event time, the bundled sample
checked message by message, and the paced clocks."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from pipeline.cli import sample_log
from pipeline.config import Config, embedded_default, load_config
from pipeline.pgcluster import Cluster
from pipeline.replay import ClockChoice, parse_clock, replay
from pipeline.report import ReportCollector, render_report

GOLDEN = Path(__file__).parent / "fixtures" / "sample_outcomes.jsonl"


def config_on(cluster: Cluster, tmp_path: Path, **pipeline: Any) -> Config:
    """The embedded default config, on the session's cluster."""
    text = embedded_default().read_text()
    text = re.sub(r"^data_dir = .*$", f'data_dir = "{cluster.data_dir}"', text, flags=re.M)
    for key, value in pipeline.items():
        text = re.sub(rf"^{key} = \S+", f"{key} = {value}", text, flags=re.M)
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path)


async def outcomes_file(cfg: Config) -> str:
    out = io.StringIO()
    await replay(cfg, [sample_log()], out=out)
    return out.getvalue()


async def test_same_log_same_bytes_with_many_active_conversations(
    cluster: Cluster, tmp_path: Path,
) -> None:
    cfg = config_on(cluster, tmp_path, max_active_conversations=64, channel_capacity=4)
    runs = [await outcomes_file(cfg) for _ in range(3)]
    assert runs[0] and runs[0] == runs[1] == runs[2]


async def test_the_bundled_sample_message_by_message(
    cluster: Cluster, tmp_path: Path,
) -> None:
    """After a deliberate change, regenerate with
    ``pipeline replay --out tests/fixtures/sample_outcomes.jsonl`` and review the diff."""
    got = await outcomes_file(config_on(cluster, tmp_path))
    expected = GOLDEN.read_text()
    for n, (a, b) in enumerate(zip(got.splitlines(), expected.splitlines(), strict=True), 1):
        assert a == b, f"line {n} differs"


async def test_context_modes_do_not_change_the_outcomes_file(
    cluster: Cluster, tmp_path: Path,
) -> None:
    files = {}
    for mode in ("sequential", "parallel", "single", "batched", "claimed"):
        files[mode] = await outcomes_file(config_on(cluster, tmp_path, mode=f'"{mode}"'))
    assert len(set(files.values())) == 1


async def test_burst_windows_follow_recorded_time(
    cluster: Cluster, tmp_path: Path,
) -> None:
    result = await replay(config_on(cluster, tmp_path), [sample_log()])
    assert 589 < result.virtual_s < 600  # the log's span
    assert result.sink.actions["merged"] == 9
    # every user message's real latency, from entering the pipeline to its outcome, is kept
    users = sum(n for a, n in result.sink.actions.items() if a not in ("ignored", "invalid"))
    assert result.message_ms.count == users > 0
    assert 0 < result.message_ms.percentile(50) <= result.message_ms.percentile(99)


async def test_report_from_a_replay(cluster: Cluster, tmp_path: Path) -> None:
    collector = ReportCollector()
    result = await replay(config_on(cluster, tmp_path), [sample_log()], report=collector)
    page = render_report(collector.finish(result.metrics, result.sink, events=result.events,
                                          real_s=result.elapsed_s,
                                          virtual_s=result.virtual_s))
    assert "<svg" in page and "replied" in page and "http://" not in page


async def test_ten_times_faster_on_the_real_clock(cluster: Cluster, tmp_path: Path) -> None:
    log = tmp_path / "short.jsonl"
    lines = sample_log().read_text().splitlines()[:6]  # about 10 recorded seconds
    log.write_text("\n".join(lines) + "\n")
    start = trio.current_time()
    result = await replay(config_on(cluster, tmp_path), [log], clock=ClockChoice(False, 10))
    took = trio.current_time() - start
    assert 0.5 < took < 5  # ~1 s of real time for ~10 s of recorded time (+ set-up)
    # one outcome per line (each holds one message or event); which are merged depends on
    # the real clock, so only the total is exact
    assert result.sink.total == 6


def test_clock_option() -> None:
    assert parse_clock("event") == parse_clock("virtual") == ClockChoice(True)
    assert parse_clock("real") == ClockChoice(False, 1.0)
    assert parse_clock("10x") == ClockChoice(False, 10.0)
    assert parse_clock("0.5x") == ClockChoice(False, 0.5)
    for bad in ("fast", "0x", "x", "-2x"):
        with pytest.raises(ValueError, match=r"^--clock must be event, real or a speed"):
            parse_clock(bad)
