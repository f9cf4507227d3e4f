"""scripts/bench_replay.py at a tiny size: both replays of the bundled sample through the
latency proxy, and the faithful runs' outcomes identical. No timing is asserted: the
figures belong in the README."""

from __future__ import annotations

import pytest
from test_latency_proxy import load_script

from pipeline.cli import sample_log

bench_replay = load_script("bench_replay")


def test_tiny_run_compares_the_two_replays(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_replay.main(["--repeat", "2", "--delay-ms", "1", "--fsync", "off",
                              "--log", str(sample_log())])
    assert code == 0
    out = capsys.readouterr().out
    assert "| faithful (`--clock event`) |" in out and "| pushed (`--clock 100000x`) |" in out
    assert "faithful / pushed: " in out
    assert "faithful outcomes identical in all 2 runs: True" in out
