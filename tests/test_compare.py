"""What-if comparison of two configs over the same log."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from pipeline.cli import sample_log
from pipeline.compare import compare_outcomes, render
from pipeline.config import embedded_default
from pipeline.pgcluster import Cluster


def line(mid: str, action: str, reply: str | None = None, reason: str | None = None) -> str:
    return json.dumps({"message_id": mid, "instance": "demo", "sender": "55", "action": action,
                       "reply": reply, "reason": reason, "timings_ms": {"context": 1}})


def test_differences_are_matched_by_message_and_occurrence() -> None:
    a = "\n".join([line("m1", "replied", "hi"), line("m2", "replied", "x"),
                   line("m2", "duplicate", reason="redelivered message id"),
                   json.dumps({"message_id": None, "action": "invalid"})])
    b = "\n".join([line("m1", "replied", "hi"), line("m2", "escalated", "human soon", "kw"),
                   line("m2", "duplicate", reason="redelivered message id")])
    result = compare_outcomes(a, b)
    assert result.compared == 3
    assert [(d.message_id, d.before["action"], d.after["action"])
            for d in result.differences] == [("m2", "replied", "escalated")]
    text = render(result, "a.toml", "b.toml")
    assert text.splitlines()[0] == "compared 3 messages: 1 differ (a.toml -> b.toml)"
    assert "      1 x replied -> escalated" in text


def test_same_config_no_differences() -> None:
    a = line("m1", "replied", "hi")
    assert compare_outcomes(a, a).differences == ()


def test_cli_compare_on_the_sample(cluster: Cluster, tmp_path: Path) -> None:
    text = embedded_default().read_text()
    text = re.sub(r"^data_dir = .*$", f'data_dir = "{cluster.data_dir}"', text, flags=re.M)
    base = tmp_path / "base.toml"
    base.write_text(text)
    other = tmp_path / "other.toml"
    other.write_text(text.replace('"gerente"]', '"gerente", "frete"]'))
    done = subprocess.run([sys.executable, "-m", "pipeline", "replay", "--config", str(base),
                           "--compare", str(other), str(sample_log())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    # the sample's demo/5521987650002 asks about "frete": escalated, the rest of it held
    assert re.fullmatch(r"compared 105 messages: 5 differ \(.*base\.toml -> .*other"
                        r"\.toml\)", first)
    assert "escalated (keyword: frete)" in done.stdout
