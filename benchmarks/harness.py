"""What the PostgreSQL benchmarks share: a scratch database migrated as
`listener migrate` does, and the real daemon built by the composition root
(listener.runtime.assemble) on the SQL backend, as `listener run` runs it."""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import psycopg

from listener import migrate
from listener.adapters.email_outbox import OutboxSender
from listener.adapters.source_notify import NotifySource
from listener.adapters.store_sql import SqlStore
from listener.backend import Backend
from listener.instants import HOUR, SECOND
from listener.rules import load_rules
from listener.rules.query import table_queries
from listener.runtime import assemble, recipients_of
from listener.settings import Settings

CUSTOMER = "22222222-2222-4222-8222-222222222222"
MECHANIC = "11111111-1111-4111-8111-111111111111"


def admin_conninfo() -> str:
    try:
        conninfo = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
        psycopg.connect(conninfo).close()
        return conninfo
    except psycopg.Error:
        import pgserver

        return pgserver.get_server(tempfile.mkdtemp(), cleanup_mode="delete").get_uri()


def with_dbname(admin: str, name: str) -> str:
    if admin.startswith("postgresql://"):
        base, _, query = admin.partition("?")
        return base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    return admin.replace("dbname=postgres", f"dbname={name}")


@contextlib.contextmanager
def scratch_database(admin: str):  # type: ignore[no-untyped-def]
    """A new database with the migrations, the reference app schema and the
    shipped packs' per-table objects (triggers); dropped on the way out."""
    name = f"listener_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    conninfo = with_dbname(admin, name)
    try:
        migrate.apply(conninfo, include_reference=True,
                      queries=table_queries(load_rules({}), HOUR))
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("insert into auth.users (id, email) values (%s, 'c@example.com')",
                         (CUSTOMER,))
            conn.execute("insert into public.profiles (id, full_name) values (%s, 'C')",
                         (CUSTOMER,))
            conn.execute("insert into auth.users (id, email) values (%s, 'm@example.com')",
                         (MECHANIC,))
            conn.execute("insert into public.profiles (id, full_name) values (%s, 'M')",
                         (MECHANIC,))
        yield conninfo
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"drop database if exists {name} with (force)")


@contextlib.asynccontextmanager
async def running_daemon(conninfo: str, *, on_result: Callable[[Any], None] | None = None,
                         env: dict[str, str] | None = None,
                         reconcile_s: float = 600.0) -> AsyncIterator[Any]:
    """The daemon running (holding the lease, subscribed, first sweep done)."""
    ruleset = load_rules(env or {})
    settings = Settings(database_url=conninfo, next_public_app_url="https://app.example",
                        email_from="Listener <l@example.com>",
                        support_email="support@example.com", lease_ttl=15 * SECOND,
                        reconcile_interval=int(reconcile_s * SECOND))
    queries = table_queries(ruleset, settings.max_notify_lateness)
    store = SqlStore(conninfo, queries, recipients=recipients_of(ruleset), max_size=12)
    source = NotifySource(conninfo, queries)
    await store.open()
    outbox = Path(tempfile.mkdtemp(prefix="listener-bench-outbox-"))
    try:
        async with assemble(settings, ruleset, backend=Backend("postgres", store, source, conninfo),
                            sender=OutboxSender(outbox), holder="bench", email_rate=1000,
                            on_result=on_result, shutdown_grace_s=3.0) as listener:
            daemon = listener.daemon
            stop = asyncio.Event()
            task = asyncio.create_task(daemon.run(stop))
            try:
                yield daemon
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        await store.close()


async def until_active(daemon: Any, timeout: float = 120.0) -> None:
    await asyncio.wait_for(daemon.events.active.wait(), timeout)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
