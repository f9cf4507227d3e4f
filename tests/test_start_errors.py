"""What a user sees when the database cannot be had at start: one line, never a traceback.

A malformed ``database.dsn`` is bad config (exit 2, named with its file and key, or with the
environment variable that set it); a server that cannot be reached, or an embedded cluster
that cannot be made, is a run-time failure (exit 1). Passwords never show.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import _user_errors, sample_log
from pipeline.config import ConfigError, dsn_problem
from pipeline.db import DatabaseUnavailable
from pipeline.pgcluster import ClusterError

PASSWORD = "s3cr3t-pw"
BAD_DSN = f"postgresql://u:{PASSWORD}@h/db?x==y"
NOWHERE_DSN = f"postgresql://u:{PASSWORD}@127.0.0.1:1/db"  # nothing listens on port 1


def config(path: Path, database: str) -> Path:
    path.write_text(f'[database]\n{database}\n[webhook]\nport = 0\n'
                    '[[instances]]\nname = "a"\n')
    return path


def pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})},
                          stdin=subprocess.DEVNULL)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The only line on stderr (nothing else was printed, and no traceback)."""
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    return lines[0]


@pytest.mark.parametrize("command", ["run", "replay"])
def test_a_malformed_dsn_is_bad_config(tmp_path: Path, command: str) -> None:
    cfg = config(tmp_path / "bad.toml", f'dsn = "{BAD_DSN}"')
    done = pipeline(command, "--config", str(cfg), *([str(sample_log())] * (command == "replay")))
    assert done.returncode == 2
    assert one_line(done) == (f'{cfg}: [database] dsn is not a valid connection string: extra '
                              f'key/value separator "=" in URI query parameter: "x"')


def test_check_config_reports_a_malformed_dsn(tmp_path: Path) -> None:
    cfg = config(tmp_path / "bad.toml", f'dsn = "{BAD_DSN}"')
    done = pipeline("check-config", str(cfg))
    assert done.returncode == 2
    assert re.fullmatch(rf"{re.escape(str(cfg))}: \[database\] dsn is not a valid connection "
                        r"string: .*", one_line(done))


def test_a_malformed_dsn_from_the_environment_says_so(tmp_path: Path) -> None:
    cfg = config(tmp_path / "ok.toml", "")
    done = pipeline("run", "--config", str(cfg), env={"PIPELINE_DATABASE_DSN": BAD_DSN})
    assert done.returncode == 2
    assert one_line(done).startswith(f"{cfg}: [database] dsn (from PIPELINE_DATABASE_DSN) is "
                                     "not a valid connection string: extra key/value separator")


def test_a_malformed_replay_db_option_is_bad_usage(tmp_path: Path) -> None:
    done = pipeline("replay", "--db", BAD_DSN, str(sample_log()))
    assert done.returncode == 2
    assert one_line(done).startswith("pipeline replay: --db is not a valid connection string: "
                                     "extra key/value separator")


@pytest.mark.parametrize("command", ["run", "replay", "escalations"])
def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path: Path, command: str) -> None:
    cfg = config(tmp_path / "nowhere.toml", f'dsn = "{NOWHERE_DSN}"')
    extra = {"run": [], "replay": [str(sample_log())], "escalations": ["list"]}[command]
    done = pipeline(command, *extra, "--config", str(cfg))
    assert done.returncode == 1
    assert re.search(r"database\.dsn: cannot reach the server: connection to server at "
                     r'"127\.0\.0\.1", port 1 failed: Connection refused$', one_line(done))


def test_an_embedded_cluster_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    cfg = config(tmp_path / "cfg.toml", f'data_dir = "{tmp_path}/file/pgdata"')
    done = pipeline("replay", "--config", str(cfg), str(sample_log()))
    assert done.returncode == 1
    assert re.search(rf"cannot create {re.escape(str(tmp_path))}/file/pgdata\b.*: "
                     r"not a directory$", one_line(done))


# --- the pieces, without a process ------------------------------------------------------------

@pytest.mark.parametrize(("dsn", "reason"), [
    ("postgresql://u:p4ss@h/db", None),
    ("host=h password=p4ss dbname=d", None),
    ("", None),
    ("postgresql://u:p4%zz@h/db", 'invalid percent-encoded token: "***"'),
    ("postgresql://u:p4ss@[h/db", 'end of string reached when looking for matching "]" in '
                                  'IPv6 host address in URI: "postgresql://u:***@[h/db"'),
    ("http://u:p4ss@h/db", 'missing "=" after "http://u:***@h/db" in connection info string'),
    ("host=h password=p4 ss", 'missing "=" after "***" in connection info string'),
    ("host=h password='p4ss", "unterminated quoted string in connection info string"),
])
def test_dsn_problems_mask_the_password(dsn: str, reason: str | None) -> None:
    assert dsn_problem(dsn) == reason


def test_errors_from_nurseries_are_unwrapped() -> None:
    cluster, config = ClusterError("initdb failed"), ConfigError(["a.toml: bad"])
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [cluster]), config])
    assert _user_errors(nested) == [cluster, config]
    assert _user_errors(DatabaseUnavailable("down")) is not None
    assert _user_errors(ExceptionGroup("g", [cluster, ValueError("bug")])) is None
    assert _user_errors(ValueError("bug")) is None
