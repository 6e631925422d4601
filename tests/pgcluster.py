"""A PostgreSQL cluster of the tests' own: Debian's PostgreSQL 15 server binaries,
initdb into a temporary folder, a free port on 127.0.0.1, trust auth.

For what the shared server on 5432 must not be put through: a preloaded
extension (pg_cron), or being restarted and crashed under load while other
tests use it. PostgreSQL refuses to run as root, so as root the cluster runs
as the `postgres` user. Durability is switched off (fsync, synchronous
commit): a crash restart still replays the WAL the server wrote, which is what
the tests exercise, without waiting on the disk.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Mapping

import psycopg

BIN = Path("/usr/lib/postgresql/15/bin")


class Shutdown(str, Enum):
    """pg_ctl's shutdown modes: `fast` disconnects clients and checkpoints;
    `immediate` kills every process as a crash would (the start replays WAL)."""

    FAST = "fast"
    IMMEDIATE = "immediate"


def available() -> str | None:
    """Why a private cluster cannot start here, or None."""
    if not (BIN / "initdb").exists():
        return f"{BIN}/initdb missing (PostgreSQL 15 server binaries: apt-get install postgresql-15)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class PrivateCluster:
    port: int
    folder: Path
    database: str = "postgres"  # what conninfo() and url name unless told otherwise

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "log"

    def conninfo(self, dbname: str | None = None) -> str:
        return (f"host=127.0.0.1 port={self.port} user=postgres "
                f"dbname={dbname or self.database} connect_timeout=5")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _pg_ctl(self, *args: str) -> None:
        # -l: the server's output goes to the log file, never to a pipe this
        # process would wait on.
        subprocess.run(_as_owner([str(BIN / "pg_ctl"), "-D", str(self.data), "-l",
                                  str(self.log), *args]), check=True, capture_output=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create_database(self, name: str) -> str:
        """A new database in the cluster; its conninfo."""
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.conninfo(name)

    def restart(self, mode: Shutdown = Shutdown.FAST) -> None:
        """Stop the server (`mode`) and start it again; returns once it accepts
        connections."""
        self._pg_ctl("-m", mode.value, "-w", "-t", "60", "restart")
        self.wait_ready()

    def stop(self, mode: Shutdown = Shutdown.IMMEDIATE) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-m", mode.value, "-w", "stop")


def start(settings: Mapping[str, str] | None = None) -> PrivateCluster:
    """initdb and start a cluster with these postgresql.conf settings added."""
    folder = Path(tempfile.mkdtemp(prefix="listener-pg-own-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    cluster = PrivateCluster(_free_port(), folder)
    subprocess.run(_as_owner([str(BIN / "initdb"), "-D", str(cluster.data), "-U", "postgres",
                              "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    lines = {"port": str(cluster.port), "listen_addresses": "'127.0.0.1'",
             "unix_socket_directories": f"'{folder}'", "fsync": "off",
             "synchronous_commit": "off", "full_page_writes": "off", **(settings or {})}
    with open(cluster.data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write("\n" + "".join(f"{name} = {value}\n" for name, value in lines.items()))
    cluster._pg_ctl("-w", "-t", "60", "start")
    cluster.wait_ready()
    return cluster


@contextlib.contextmanager
def private_cluster(settings: Mapping[str, str] | None = None) -> Iterator[PrivateCluster]:
    """A started cluster, stopped and removed on the way out."""
    cluster = start(settings)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)
