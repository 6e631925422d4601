"""Running the real daemon against a test database, and writing app rows."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg.types.json import Jsonb

from listener.adapters.email_outbox import OutboxSender
from listener.adapters.source_notify import NotifySource
from listener.adapters.store_sql import SqlStore
from listener.backend import Backend
from listener.executor import ActionResult
from listener.instants import SECOND
from listener.rules import load_rules
from listener.rules.query import table_queries
from listener.runtime import assemble, recipients_of
from listener.settings import Settings

CUSTOMER = "22222222-2222-4222-8222-222222222222"
MECHANIC = "11111111-1111-4111-8111-111111111111"
FAST = {"RULES_TIME_SCALE": "600"}  # 3 min -> 0.3 s, 15 min -> 1.5 s, 1 h -> 6 s


def seed_people(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into auth.users (id, email) values (%s, 'carla@example.com') "
                     "on conflict do nothing", (CUSTOMER,))
        conn.execute("insert into public.profiles (id, full_name) values (%s, 'Carla Customer') "
                     "on conflict do nothing", (CUSTOMER,))
        conn.execute("insert into public.mechanics (id, name, email) values "
                     "(%s, 'Max Mechanic', 'max@example.com') on conflict do nothing",
                     (MECHANIC,))


def insert_session(conninfo: str, **columns: Any) -> str:
    columns.setdefault("id", str(uuid.uuid4()))
    columns.setdefault("customer_user_id", CUSTOMER)
    columns = {k: Jsonb(v) if isinstance(v, dict) else v for k, v in columns.items()}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"insert into public.sessions ({names}) values ({marks})",
                     list(columns.values()))
    return str(columns["id"])


def update_session(conninfo: str, sid: str, **columns: Any) -> None:
    sets = ", ".join(f"{k} = %s" for k in columns)
    values = [Jsonb(v) if isinstance(v, dict) else v for v in columns.values()]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"update public.sessions set {sets} where id = %s", [*values, sid])


def query(conninfo: str, sql: str, *params: Any) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


async def eventually(check: Callable[[], Any], timeout: float = 20.0,
                     interval: float = 0.05) -> Any:
    """Wait until check() is truthy (behaviour, not timing: the timeout is generous)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


class LiveDaemon:
    """The real daemon, in process, built by the composition root; by default on
    the SQL backend (SqlStore and NotifySource on `conninfo`), emails to an
    outbox folder. `store`, `source`, `sender` and `publisher` replace parts."""

    def __init__(self, conninfo: str | None, outbox: Path, env: dict[str, str] | None = None,
                 holder: str | None = None, lease_ttl_s: float = 3.0,
                 reconcile_s: float = 60.0, store: Any = None, source: Any = None,
                 sender: Any = None, publisher: Any = None, email_rate: float = 1000,
                 rules: list[Any] = (), settings: dict[str, Any] | None = None) -> None:
        self.conninfo = conninfo
        self.outbox = outbox
        self.table = load_rules(env if env is not None else FAST, rules)
        self.settings = Settings(
            database_url=conninfo, next_public_app_url="https://app.example",
            email_from="Listener <l@example.com>", support_email="support@example.com",
            lease_ttl=int(lease_ttl_s * SECOND), reconcile_interval=int(reconcile_s * SECOND),
            **(settings or {}))
        queries = table_queries(self.table, self.settings.max_notify_lateness)
        self.store = store or SqlStore(conninfo, queries)
        if not getattr(self.store, "recipients", True):
            self.store.recipients = recipients_of(self.table)  # a test's own store subclass
        self.source = source or NotifySource(conninfo, queries, idle_probe=2.0)
        self.sender = sender or OutboxSender(outbox)
        self.publisher = publisher
        self.email_rate = email_rate
        self.holder = holder or f"test-{uuid.uuid4().hex[:6]}"
        self.results: list[ActionResult] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None
        self._exit = contextlib.AsyncExitStack()

    async def __aenter__(self) -> "LiveDaemon":
        await self.store.open()
        backend = Backend("supabase" if self.conninfo is None else "postgres", self.store,
                          self.source, self.conninfo)
        self.listener = await self._exit.enter_async_context(assemble(
            self.settings, self.table, backend=backend, sender=self.sender,
            publisher=self.publisher, holder=self.holder, email_rate=self.email_rate,
            mailer_options={"base_delay": 0.05, "max_delay": 0.5}, shutdown_grace_s=3.0,
            on_result=self.results.append))
        self.daemon = self.listener.daemon
        self.task = asyncio.create_task(self.daemon.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)
        await self._exit.aclose()
        await self.store.close()

    async def active(self, timeout: float = 20.0) -> None:
        """Until the daemon holds the lease, is subscribed and has swept once;
        fails at once if it stopped instead."""
        active = asyncio.ensure_future(self.daemon.events.active.wait())
        stopped = asyncio.ensure_future(self.daemon.events.stopped.wait())
        try:
            await asyncio.wait([active, stopped], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            active.cancel()
            stopped.cancel()
        if self.daemon.events.stopped.is_set():
            raise AssertionError("the daemon stopped before it became active")
        if not self.daemon.events.active.is_set():
            raise AssertionError(f"not active within {timeout} s")

    def fired(self, rule: str | None = None) -> list[ActionResult]:
        return [r for r in self.results if rule is None or r.key.rule == rule]


def ledger(conninfo: str, sid: str | None = None) -> list[tuple]:
    sql = "select rule, state, session_id::text from public.listener_ledger"
    if sid:
        return query(conninfo, sql + " where session_id = %s order by due_at", sid)
    return query(conninfo, sql + " order by due_at")
