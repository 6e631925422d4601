"""A PostgreSQL cluster of the tests' own with the real pg_cron extension.

pg_cron must be preloaded (`shared_preload_libraries`) and runs its jobs in
one database (`cron.database_name`), so it cannot be added to the shared
server on 5432: this starts a throwaway cluster (initdb into a temporary
folder, a free port), creates the extension in CRON_DATABASE, and stops and
removes the cluster at the end. PostgreSQL refuses to run as root, so as root
the cluster runs as the `postgres` user.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg

BIN = Path("/usr/lib/postgresql/15/bin")
CONTROL = Path("/usr/share/postgresql/15/extension/pg_cron.control")
CRON_DATABASE = "listener_cron"


@dataclass(frozen=True)
class CronCluster:
    port: int
    folder: Path

    def conninfo(self, dbname: str = CRON_DATABASE) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{CRON_DATABASE}"


def available() -> str | None:
    """Why the cluster cannot start here, or None."""
    if not (BIN / "initdb").exists():
        return f"{BIN}/initdb missing (PostgreSQL 15 server binaries)"
    if not CONTROL.exists():
        return f"{CONTROL} missing: apt-get install -y postgresql-15-cron"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class _Running:
    cluster: CronCluster
    data: Path


def _start() -> _Running:
    folder = Path(tempfile.mkdtemp(prefix="listener-pgcron-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    subprocess.run(_as_owner([str(BIN / "initdb"), "-D", str(data), "-U", "postgres",
                              "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    port = _free_port()
    with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(f"\nport = {port}\nlisten_addresses = '127.0.0.1'\n"
                   f"unix_socket_directories = '{folder}'\n"
                   "shared_preload_libraries = 'pg_cron'\n"
                   f"cron.database_name = '{CRON_DATABASE}'\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
    subprocess.run(_as_owner([str(BIN / "pg_ctl"), "-D", str(data), "-l",
                              str(folder / "log"), "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)
    cluster = CronCluster(port, folder)
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
                conn.execute(f'create database "{CRON_DATABASE}"')
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("create extension pg_cron")
    return _Running(cluster, data)


def _stop(running: _Running) -> None:
    subprocess.run(_as_owner([str(BIN / "pg_ctl"), "-D", str(running.data), "-m", "immediate",
                              "-w", "stop"]), capture_output=True)
    shutil.rmtree(running.cluster.folder, ignore_errors=True)


def cron_cluster() -> Iterator[CronCluster]:
    """The body of a session-scoped fixture: a started cluster, removed afterwards."""
    running = _start()
    try:
        yield running.cluster
    finally:
        _stop(running)
