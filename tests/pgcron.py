"""A private PostgreSQL cluster (tests/pgcluster.py) with the real pg_cron extension.

pg_cron must be preloaded (`shared_preload_libraries`) and runs its jobs in
one database (`cron.database_name`), so it cannot be added to the shared
server on 5432: this starts a cluster of the tests' own, creates the
extension in CRON_DATABASE, and removes the cluster at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import psycopg

from tests import pgcluster
from tests.pgcluster import PrivateCluster

CONTROL = Path("/usr/share/postgresql/15/extension/pg_cron.control")
CRON_DATABASE = "listener_cron"


def available() -> str | None:
    """Why the cluster cannot start here, or None."""
    missing = pgcluster.available()
    if missing is not None:
        return missing
    if not CONTROL.exists():
        return f"{CONTROL} missing: apt-get install -y postgresql-15-cron"
    return None


def cron_cluster() -> Iterator[PrivateCluster]:
    """The body of a session-scoped fixture: a started cluster whose conninfo()
    and url name CRON_DATABASE, removed afterwards."""
    with pgcluster.private_cluster({"shared_preload_libraries": "'pg_cron'",
                                    "cron.database_name": f"'{CRON_DATABASE}'"}) as cluster:
        cluster.create_database(CRON_DATABASE)
        cluster.database = CRON_DATABASE
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("create extension pg_cron")
        yield cluster
