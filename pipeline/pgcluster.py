"""The embedded private PostgreSQL: a cluster of our own, made with the installed binaries.

With no DSN configured the pipeline keeps its state in a cluster under ``database.data_dir``:
created with ``initdb`` (trust authentication, Unix socket inside the data directory, no TCP
unless a port is configured), started with ``pg_ctl``, reused across runs. PostgreSQL refuses
to run as root, so when we are root the server runs as the ``postgres`` user.

Everything here is synchronous (a few subprocess calls at start and stop); Trio code calls it
through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

import attrs

SERVER_USER = "postgres"
SOCKET_PORT = 5432
INSTALL_HINT = (
    "install the PostgreSQL server (Debian: apt-get install postgresql), "
    "set PIPELINE_PG_BINDIR to the folder holding initdb and pg_ctl, "
    "or set database.dsn to use a running server"
)


class ClusterError(Exception):
    """The embedded cluster could not be found, created, started or stopped."""


def find_bindir(debian: Path = Path("/usr/lib/postgresql"), path: str | None = None) -> Path:
    """Folder of ``initdb``/``pg_ctl``: $PIPELINE_PG_BINDIR, Debian's newest, or PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("PIPELINE_PG_BINDIR"):
        candidates.append(Path(env))
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        candidates.extend(p / "bin" for p in reversed(versions))
    if found := shutil.which("pg_ctl", path=path):
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise ClusterError(f"postgresql server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}")


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


@attrs.frozen
class Cluster:
    """One private cluster. ``durable=False`` turns fsync off: for throwaway test clusters."""

    data_dir: Path = attrs.field(converter=_absolute)
    tcp_port: int = 0
    durable: bool = True
    bindir: Path = attrs.field(factory=find_bindir)

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` on this cluster's socket."""
        return f"host={self.socket_dir} port={self._port} user={SERVER_USER} dbname={dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """The same as a URL, for tools that prefer one (``psql "$(pipeline db url)"``)."""
        host = str(self.socket_dir).replace("/", "%2F")
        return f"postgresql://{SERVER_USER}@{host}:{self._port}/{dbname}"

    @property
    def _port(self) -> int:
        return self.tcp_port or SOCKET_PORT

    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def ensure_initialized(self) -> bool:
        """Create the cluster unless it exists; True when it was created now."""
        if self.initialized:
            return False
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._hand_to_server_user(self.data_dir)
        self._run("initdb", "-D", str(self.data_dir), "-U", SERVER_USER, "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-instructions")
        self._write_settings()
        return True

    def _write_settings(self) -> None:
        listen = "'127.0.0.1'" if self.tcp_port else "''"
        lines = [
            "# written by the pipeline (pipeline/pgcluster.py)",
            f"listen_addresses = {listen}",
            f"port = {self._port}",
            f"unix_socket_directories = '{self.socket_dir}'",
            "max_connections = 300",
            "shared_buffers = 128MB",
        ]
        if not self.durable:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n" + "\n".join(lines) + "\n")

    def status(self) -> str:
        """``running``, ``stopped`` or ``absent`` (no cluster in the data directory)."""
        if not self.initialized:
            return "absent"
        done = self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False)
        return "running" if done.returncode == 0 else "stopped"

    def start(self) -> bool:
        """Create if needed and start unless running; True when this call started it."""
        self.ensure_initialized()
        if self.status() == "running":
            return False
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_file),
                  "-w", "-t", "60", "-s")
        return True

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if it runs; True when this call stopped it."""
        if self.status() != "running":
            return False
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "-s")
        return True

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / tool), *args]
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            cmd, capture_output=True, text=True, check=False, **self._as_server_user())
        if check and done.returncode != 0:
            detail = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
            hint = self._log_tail() if tool == "pg_ctl" else ""
            raise ClusterError(f"{tool} failed for {self.data_dir}: {detail}{hint}")
        return done

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-5:]
        except OSError:
            return ""
        return "\nlast lines of " + str(self.log_file) + ":\n" + "\n".join(lines)

    @staticmethod
    def _as_server_user() -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise ClusterError(
                f"running as root, but there is no '{SERVER_USER}' user to run the server as: "
                f"{INSTALL_HINT}"
            ) from None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": entry.pw_dir,
               "LC_ALL": "C"}
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "env": env,
                "cwd": "/"}

    @staticmethod
    def _hand_to_server_user(folder: Path) -> None:
        if os.geteuid() != 0:
            return
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            return  # _run reports it
        os.chown(folder, entry.pw_uid, entry.pw_gid)
        folder.chmod(0o700)


def valid_dbname(name: str) -> str:
    """Database names we create are plain identifiers; refuse anything else."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ClusterError(f"database name must be a lower-case identifier, not {name!r}")
    return name
