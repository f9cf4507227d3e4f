"""The command line as a user runs it: a real subprocess against the session's cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.cli import sample_log
from pipeline.config import embedded_default
from pipeline.pgcluster import Cluster


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def config_file(tmp_path: Path, cluster: Cluster) -> Path:
    """The example config, pointed at the (running) session cluster."""
    text = embedded_default().read_text()
    text = re.sub(r'^data_dir = .*$', f'data_dir = "{cluster.data_dir}"', text, flags=re.M)
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_replay_sample_prints_summary_and_writes_outcomes(config_file: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "outcomes.jsonl"
    done = run("replay", "--config", str(config_file), "--out", str(out), str(sample_log()))
    assert done.returncode == 0, done.stderr
    assert re.search(r"^replayed 107 events in ", done.stdout, re.M)
    assert re.search(r"^actions: duplicate=\d+, escalated=\d+, held=\d+, ignored=\d+, "
                     r"invalid=2, merged=\d+, replied=\d+$", done.stdout, re.M)
    assert re.search(r"^context\s+\d+\s+\d+", done.stdout, re.M)  # the stage table
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 108  # one per inbound message (one body holds two)
    assert {"message_id", "instance", "sender", "action", "turn_id", "timings_ms"} <= set(lines[0])
    assert "(dropped)" in done.stdout


def test_replay_reports_bad_lines_with_file_and_line(config_file: Path,
                                                     tmp_path: Path) -> None:
    log = tmp_path / "bad.jsonl"
    log.write_text('{"received_at": "2025-08-31T10:00:00Z", "format": "cloud-api", '
                   '"body": {"object": "whatsapp_business_account", "entry": []}}\n'
                   "not json\n")
    done = run("replay", "--config", str(config_file), str(log))
    assert done.returncode == 0, done.stderr
    assert f"{log}:2: line is not valid json" in done.stdout


def test_replay_missing_log_is_a_usage_error(config_file: Path) -> None:
    done = run("replay", "--config", str(config_file), "/nonexistent.jsonl")
    assert done.returncode == 2
    assert "no such log file: /nonexistent.jsonl" in done.stderr


def test_check_config_reports_every_problem_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[pipeline]\nmax_active_conversation = 3\n[database]\npool_size = 0\n'
                   '[[instances]]\nname = "a"\n')
    done = run("check-config", str(bad))
    assert done.returncode == 2
    assert re.search(rf"^{re.escape(str(bad))}: \[pipeline\] unknown key "
                     r"'max_active_conversation' \(did you mean 'max_active_conversations'\?\)",
                     done.stderr, re.M)
    assert re.search(r"\[database\] pool_size must be an integer >= 1, not 0$", done.stderr,
                     re.M)


def test_check_config_accepts_the_example() -> None:
    done = run("check-config", "config/pipeline.toml", cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config/pipeline.toml: ok")


def test_bad_config_stops_every_command_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\n")
    done = run("replay", "--config", str(bad))
    assert done.returncode == 2
    assert "invalid toml" in done.stderr


def test_db_commands_on_an_embedded_cluster(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="pipeline-cli-"))
    root.chmod(0o755)  # the server user must reach the data dir
    cfg = tmp_path / "db.toml"
    cfg.write_text(f'[database]\ndata_dir = "{root}/data"\n[[instances]]\nname = "a"\n')
    try:
        assert run("db", "status", "--config", str(cfg)).returncode == 3  # absent
        started = run("db", "start", "--config", str(cfg))
        assert started.returncode == 0 and started.stdout.startswith("started"), started.stderr
        assert run("db", "start", "--config", str(cfg)).stdout.startswith("already running")
        status = run("db", "status", "--config", str(cfg))
        assert status.returncode == 0 and status.stdout.startswith("running")
        url = run("db", "url", "--config", str(cfg)).stdout.strip()
        assert url.startswith("postgresql://postgres@") and url.endswith("/pipeline")
        migrated = run("db", "migrate", "--config", str(cfg))
        assert migrated.returncode == 0 and "migrated" in migrated.stdout, migrated.stderr
        assert run("db", "migrate", "--config", str(cfg)).returncode == 0  # again: a no-op
        stopped = run("db", "stop", "--config", str(cfg))
        assert stopped.stdout.startswith("stopped")
        assert run("db", "status", "--config", str(cfg)).stdout.startswith("stopped")
    finally:
        run("db", "stop", "--config", str(cfg))
        shutil.rmtree(root, ignore_errors=True)


def test_json_logs_never_show_secrets(config_file: Path) -> None:
    secret = "s3cr3t-app-secret-value"
    text = config_file.read_text().replace('app_secret = ""', f'app_secret = "{secret}"')
    config_file.write_text(text)
    done = run("--log-format", "json", "--log-level", "DEBUG", "replay", "--config",
               str(config_file), str(sample_log()),
               env={"PIPELINE_RESOLVE_TOKEN": "resolve-token-value"})
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all("record" in r for r in records)
    assert secret not in done.stderr + done.stdout
    assert "resolve-token-value" not in done.stderr + done.stdout


def _start_run(config_file: Path, out: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config",
                             str(config_file), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    return proc, line.split()[-1]


def _stop(proc: subprocess.Popen[str]) -> str:
    import signal

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return stdout


def test_run_serves_webhooks_and_a_stopped_run_leaves_its_work_to_the_next(
    config_file: Path, tmp_path: Path,
) -> None:
    """SIGTERM right after a webhook was acknowledged, before its burst window closed: the
    message waits in the inbox (the stop does not wait for new bursts), and the next
    ``pipeline run`` answers it -- once."""
    import time

    import httpx

    text = config_file.read_text().replace("port = 8080", "port = 0")
    text = text.replace('record_dir = ""', f'record_dir = "{tmp_path / "rec"}"')
    config_file.write_text(text)
    outs = [tmp_path / "outcomes-1.jsonl", tmp_path / "outcomes-2.jsonl"]
    proc, url = _start_run(config_file, outs[0])
    try:
        body = json.loads((Path(__file__).parent / "fixtures/cloud-api/01_text.json").read_text())
        body["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = "wamid.cli-run"
        r = httpx.post(f"{url}/webhook/cloud-api", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["stored"] == 1
    finally:
        first = _stop(proc)
    proc, _ = _start_run(config_file, outs[1])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                o.exists() and o.read_text() for o in outs):
            time.sleep(0.05)
    finally:
        second = _stop(proc)
    assert ("actions: replied=1" in first) != ("actions: replied=1" in second)
    [line] = "".join(o.read_text() for o in outs if o.exists()).splitlines()
    assert json.loads(line)["message_id"] == "wamid.cli-run"
    [log] = (tmp_path / "rec").iterdir()
    replayed = run("replay", "--config", str(config_file), str(log))
    assert replayed.returncode == 0 and "replied=1" in replayed.stdout


def test_replay_into_a_given_database(config_file: Path, cluster: Cluster) -> None:
    import psycopg

    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS t_replay_db")
        admin.execute("CREATE DATABASE t_replay_db TEMPLATE pipeline_template")
    done = run("replay", "--config", str(config_file), "--db", cluster.conninfo("t_replay_db"),
               str(sample_log()))
    assert done.returncode == 0, done.stderr
    with psycopg.connect(cluster.conninfo("t_replay_db")) as conn:
        row = conn.execute("SELECT count(*) FROM inbox").fetchone()
    assert row == (89,)  # the messages of the sample stored, each once
    assert "database: (dsn)" in done.stdout


def test_run_with_an_unwritable_record_dir_warns_at_start_and_serves(
    config_file: Path, tmp_path: Path,
) -> None:
    import httpx

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    text = config_file.read_text().replace("port = 8080", "port = 0")
    text = text.replace('record_dir = ""', f'record_dir = "{blocker / "rec"}"')
    config_file.write_text(text)
    proc, url = _start_run(config_file, tmp_path / "out.jsonl")
    try:
        body = json.loads((Path(__file__).parent / "fixtures/cloud-api/01_text.json").read_text())
        body["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = "wamid.norecord"
        r = httpx.post(f"{url}/webhook/cloud-api", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["stored"] == 1
    finally:
        proc.send_signal(__import__("signal").SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    [warning] = [line for line in stderr.splitlines() if "not recorded until" in line]
    assert str(blocker) in warning and "Traceback" not in stderr
