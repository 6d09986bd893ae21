"""A PostgreSQL server of our own, in a scratch directory, on a free loopback port.

For runs that take the database away and bring it back (the fault-injection run), which must
never disturb the machine's shared server. Uses the cluster tools of the installed PostgreSQL
(Debian: /usr/lib/postgresql/<version>/bin); as root it runs them as the `postgres` user,
since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from shared.broker import free_port


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server tools are not installed here."""


def server_bin_dir() -> Path:
    """Directory holding initdb and pg_ctl (the newest installed version)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise PostgresUnavailable("PostgreSQL server tools (initdb, pg_ctl) not found; apt-get install postgresql")
    return candidates[-1].parent


@dataclass
class LocalPostgres:
    """The cluster lives in a directory of its own under the system temp dir (not the caller's,
    which the `postgres` user may not be allowed to enter); `remove()` deletes it."""

    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.bin = server_bin_dir()
        self.workdir = Path(tempfile.mkdtemp(prefix="churnguard-pg-"))
        self.data = self.workdir / "pgdata"
        self.socket_dir = self.workdir / "socket"
        self.log = self.workdir / "postgres.log"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def init(self) -> LocalPostgres:
        self.socket_dir.mkdir(exist_ok=True)
        self.log.touch()
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            shutil.chown(self.socket_dir, "postgres")
            shutil.chown(self.log, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-instructions")
        return self

    def start(self) -> None:
        # fsync off: this server holds test data only, and a process crash (not an OS crash)
        # loses nothing committed anyway; the run measures our code, not the disk.
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir} "
                   "-c fsync=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: every connection drops, recovery runs at the next start."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        command = [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        """Stop the server if it runs and delete its directory."""
        if self.data.exists() and self.running:
            self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)
