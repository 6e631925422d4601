"""PostgreSQL for the tests: the server on 127.0.0.1:5432 when it answers, the
embedded one (pgserver) otherwise; one fresh database per test, cloned from a
template that has the reference schema and the migrations."""
from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import psycopg
import pytest

from listener import migrate
from listener.instants import HOUR
from listener.rules import load_rules
from listener.rules.query import table_queries
from tests.servers.postgrest_server import create_api_roles


def _server_conninfo() -> tuple[str, object | None]:
    for user in ("postgres", os.environ.get("USER") or "root"):
        conninfo = f"host=127.0.0.1 port=5432 user={user} dbname=postgres connect_timeout=3"
        try:
            with psycopg.connect(conninfo) as conn:
                conn.execute("select 1")
            return conninfo, None
        except psycopg.Error:
            continue
    import pgserver

    folder = tempfile.mkdtemp(prefix="listener-pg-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    return server.get_uri(), server


def with_dbname(conninfo: str, dbname: str) -> str:
    if conninfo.startswith("postgresql://"):
        base, _, query = conninfo.partition("?")
        return base.rsplit("/", 1)[0] + "/" + dbname + ("?" + query if query else "")
    return conninfo.replace("dbname=postgres", f"dbname={dbname}")


@contextmanager
def scratch_database(admin: str, prefix: str, template: str | None = None) -> Iterator[str]:
    """A new database (from `template` if given), dropped on the way out; its conninfo."""
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    clone = f' template "{template}"' if template else ""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"{clone}')
    try:
        yield with_dbname(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[str]:
    conninfo, server = _server_conninfo()
    yield conninfo
    if server is not None:
        server.cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def pg_template(pg_admin: str) -> Iterator[str]:
    name = f"listener_tpl_{os.getpid()}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}"')
        conn.execute(f'create database "{name}"')
    # Supabase's API roles exist before the migrations run, as on Supabase: the
    # migrations grant service_role only a role that exists, and on a fresh
    # cluster nothing else may have made them yet when the template is built.
    asyncio.run(create_api_roles(pg_admin))
    # The shipped packs' per-table objects (triggers, columns), as `listener migrate` installs them.
    migrate.apply(with_dbname(pg_admin, name), include_reference=True,
                  queries=table_queries(load_rules({}), HOUR))
    yield name
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def database(pg_admin: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database; its conninfo."""
    with scratch_database(pg_admin, "listener_t_", pg_template) as conninfo:
        yield conninfo


@pytest.fixture(scope="module")
def private_pg():
    """A PostgreSQL cluster of the tests' own, for what the shared server must
    not go through (restarts, crashes): tests/pgcluster.py."""
    from tests.pgcluster import available, private_cluster

    missing = available()
    if missing is not None:
        pytest.fail(f"a private cluster cannot start: {missing}")
    # Every commit acknowledged is on disk: a crash restart may lose nothing a
    # client was told is committed (the ledger's claims above all).
    with private_cluster({"synchronous_commit": "on"}) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_cron_cluster():
    """A PostgreSQL cluster of the tests' own with pg_cron preloaded (tests/pgcron.py)."""
    from tests.pgcron import available, cron_cluster

    missing = available()
    if missing is not None:
        pytest.fail(f"pg_cron tests need the extension: {missing}")
    yield from cron_cluster()
