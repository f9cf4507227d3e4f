"""The embedded cluster helpers that need no server of their own, and where a cluster lives."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.logs import dsn_password
from pipeline.pgcluster import (
    SOCKET_PATH_MAX,
    Cluster,
    ClusterError,
    find_bindir,
    moved_data_dir,
    place,
    valid_dbname,
)


def test_missing_binaries_say_what_to_install(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELINE_PG_BINDIR", raising=False)
    with pytest.raises(ClusterError, match=r"^postgresql server binaries \(initdb, pg_ctl\) "
                       r"not found: install the PostgreSQL server \(Debian: apt-get install "
                       r"postgresql\)"):
        find_bindir(debian=tmp_path / "none", path=str(tmp_path))


def test_bindir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for tool in ("initdb", "pg_ctl"):
        (tmp_path / tool).touch()
    monkeypatch.setenv("PIPELINE_PG_BINDIR", str(tmp_path))
    assert find_bindir(debian=tmp_path / "none", path="") == tmp_path


def test_conninfo_uses_the_private_socket(cluster: Cluster) -> None:
    assert cluster.conninfo("x") == f"host={cluster.data_dir} port=5432 user=postgres dbname=x"
    assert re.fullmatch(r"postgresql://postgres@%2F.*:5432/x", cluster.url("x"))
    assert cluster.status() == "running"


def test_no_tcp_listener_unless_configured(cluster: Cluster) -> None:
    conf = (cluster.data_dir / "postgresql.conf").read_text()
    assert "listen_addresses = ''" in conf


def test_database_names_are_checked() -> None:
    assert valid_dbname("replay_1") == "replay_1"
    with pytest.raises(ClusterError, match=r"^database name must be a lower-case identifier"):
        valid_dbname("x; DROP DATABASE y")


def test_dsn_password_is_found_for_masking() -> None:
    assert dsn_password("postgresql://u:pa55word@h/db") == "pa55word"
    assert dsn_password("host=h password=xyz dbname=d") == "xyz"
    assert dsn_password("") == ""


# --- where the cluster lives (pipeline/pgcluster.py, "Where it lives") ---------------------------

@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder everyone may traverse (pytest's tmp_path is under a mode-700 folder)."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-place-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_usable_place_is_kept(open_dir: Path) -> None:
    assert place(open_dir / "new" / "pgdata") == (open_dir / "new" / "pgdata", None)


def test_a_place_whose_socket_path_is_too_long_moves(open_dir: Path) -> None:
    deep = open_dir / ("x" * 60) / ("y" * 60) / "pgdata"
    data_dir, pointer = place(deep)
    assert pointer == deep and data_dir == moved_data_dir(deep)
    assert len(os.fsencode(data_dir / ".s.PGSQL.5432")) <= SOCKET_PATH_MAX


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only for root")
def test_a_place_the_server_user_cannot_reach_moves(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    data_dir, pointer = place(private / "pgdata")
    assert pointer == private / "pgdata"
    assert re.fullmatch(r"/var/lib/pipeline/pg-[0-9a-f]{16}/pgdata", str(data_dir))
    assert data_dir == moved_data_dir(private / "pgdata")  # the same from run to run
    assert moved_data_dir(private / "other") != data_dir


def test_the_link_left_at_the_configured_place_is_followed(open_dir: Path) -> None:
    deep = open_dir / ("x" * 60) / ("y" * 60) / "pgdata"
    deep.parent.mkdir(parents=True)
    deep.symlink_to(open_dir / "elsewhere")
    assert place(deep) == (open_dir / "elsewhere", None)  # someone's own link: used as it is
    deep.unlink()
    deep.symlink_to(moved_data_dir(deep))
    assert place(deep) == (moved_data_dir(deep), deep)  # ours: its home is remade if gone


def test_a_moved_cluster_refuses_a_home_others_can_change(open_dir: Path) -> None:
    home = open_dir / "home"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(ClusterError, match=rf"^{re.escape(str(home))} is not a folder of this "
                       r"user's that only it can change: refusing"):
        Cluster(home / "pg-1" / "pgdata", pointer=open_dir / "link").ensure_initialized()


def test_a_failing_tool_is_one_line_with_the_log_s_complaint(open_dir: Path) -> None:
    bindir = open_dir / "bin"
    bindir.mkdir()
    for tool in ("initdb", "pg_ctl"):
        (bindir / tool).write_text("#!/bin/sh\necho 'pg_ctl: could not start server' >&2\n"
                                   "echo 'Examine the log output.' >&2\nexit 1\n")
        (bindir / tool).chmod(0o755)
    cluster = Cluster(open_dir / "data", bindir=bindir)
    cluster.data_dir.mkdir()
    cluster.log_file.write_text("LOG:  starting\nFATAL:  could not bind socket\nLOG:  exit\n")
    with pytest.raises(ClusterError) as info:
        cluster._run("pg_ctl", "start")
    assert str(info.value) == (
        f"pg_ctl failed for {cluster.data_dir}: pg_ctl: could not start server; Examine the "
        f"log output. ({cluster.log_file}: FATAL:  could not bind socket)")
