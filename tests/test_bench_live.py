"""scripts/bench_live.py at a tiny size: ``pipeline run`` fed the bundled sample as webhooks
beside the baseline, every user message accounted for. No timing is asserted: the figures
belong in the README."""

from __future__ import annotations

import re

import pytest
from test_latency_proxy import load_script

from pipeline.cli import sample_log

bench_live = load_script("bench_live")


@pytest.mark.slow
def test_tiny_run_feeds_the_live_path_and_the_baseline(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_live.main(["--repeat", "1", "--clients", "4", "--log", str(sample_log())]) == 0
    captured = capsys.readouterr()
    assert "| `pipeline run` fed by webhooks |" in captured.out
    assert "| baseline (asyncio + asyncpg, no HTTP) |" in captured.out
    assert re.search(r"live / baseline: \d+\.\d\d", captured.out)
    # the sample's user messages, as its replay counts them (replied 59, escalated 5, held 14,
    # merged 9, duplicate 5: tests/test_replay_logs.py); the baseline also counts a reaction
    counts = dict(re.findall(r"  (live|baseline) +(\d+) msgs", captured.err))
    assert counts == {"live": "92", "baseline": "93"}
