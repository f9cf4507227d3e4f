"""scripts/bench_scaleout.py at a tiny size: real ``pipeline run --roles turns`` processes on
one throwaway cluster behind the latency proxy process, and every message processed exactly
once whatever the number of processes. No timing is asserted: the figures belong in the
README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_latency_proxy import load_script

scaleout = load_script("bench_scaleout")


def test_tiny_run_processes_every_message_exactly_once(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out = tmp_path / "scaleout.json"
    # a small max_active, so that the second process gets a share of the conversations
    code = scaleout.main(["--processes", "1,2", "--conversations", "20", "--delay-ms", "1",
                          "--max-active", "4", "--pool-size", "3", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    load = scaleout.make_load(scaleout.Settings(scaleout.bench.Workload(conversations=20)))
    assert set(result["processes"]) == {"1", "2"}
    for k, run in result["processes"].items():
        checks = run["checks"]
        assert checks["ok"], (k, checks)
        assert checks["inbox_rows"] == checks["processed"] == load.fresh == 100, k
        assert checks["turns"] == checks["expected_turns"] == load.turns, k
        assert checks["outcomes_reported"] == load.fresh, k  # none reported twice
        assert 0 < checks["ai_interactions"] <= load.turns, k
        assert len(run["outcomes_per_process"]) == int(k), k
        calls = {kind: v["calls"] for kind, v in run["statements"].items()}
        # group commit: turns that end together share a statement
        assert calls["claim"] > 0 and 0 < calls["commit"] <= load.turns, k
        assert calls.get("context", 0) == 0, k  # mode claimed: the claims load the context
        assert run["rtt_under_load_ms"]["samples"] > 0, k
        assert run["cpu_ms_per_msg"]["server"] > 0, k
    table = capsys.readouterr().out
    assert "| 1 |" in table and "| 2 |" in table


def test_bad_arguments_are_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert scaleout.main(["--processes", "1,0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bench_scaleout.py: --processes must be a comma-separated list of counts >= 1, "
        "not '1,0'")
    assert scaleout.main(["--delay-ms", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "bench_scaleout.py: --delay-ms must be > 0 (the workers reach the server through the "
        "proxy), not 0.0")
