"""Running the real daemon against a test database, and writing app rows."""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psycopg
from psycopg.types.json import Jsonb

from listener.adapters.email_outbox import OutboxSender
from listener.adapters.source_notify import NotifySource
from listener.adapters.store_sql import SqlStore
from listener.clock import WallClock
from listener.daemon import Daemon, DaemonConfig
from listener.emails import EmailComposer, EmailDeliverer
from listener.executor import ActionResult
from listener.instants import SECOND
from listener.mailer import Mailer
from listener.rules import load_rules

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
    """The real daemon, in process; by default on the SQL backend (SqlStore and
    NotifySource on `conninfo`), emails to an outbox folder."""

    def __init__(self, conninfo: str | None, outbox: Path, env: dict[str, str] | None = None,
                 holder: str | None = None, lease_ttl_s: float = 3.0,
                 reconcile_s: float = 60.0, store: Any = None, source: Any = None,
                 sender: Any = None, publisher: Any = None, email_rate: float = 1000) -> None:
        self.conninfo = conninfo
        self.outbox = outbox
        self.table = load_rules(env if env is not None else FAST)
        self.store = store or SqlStore(conninfo)
        self.source = source or NotifySource(conninfo, idle_probe=2.0)
        self.results: list[ActionResult] = []
        composer = EmailComposer(self.table, "https://app.example", "Listener <l@example.com>",
                                 "support@example.com")
        mailer = Mailer(sender or OutboxSender(outbox), rate_per_second=email_rate,
                        base_delay=0.05, max_delay=0.5)
        config = DaemonConfig(lease_ttl=int(lease_ttl_s * SECOND),
                              reconcile_interval=int(reconcile_s * SECOND),
                              holder=holder or f"test-{uuid.uuid4().hex[:6]}",
                              shutdown_grace_s=3.0)
        self.daemon = Daemon(self.table, self.store, self.source, WallClock(), config,
                             deliverer=EmailDeliverer(self.store, composer, mailer),
                             publisher=publisher, on_result=self.results.append)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "LiveDaemon":
        await self.store.open()
        self.task = asyncio.create_task(self.daemon.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 15)
        await self.store.close()

    async def active(self, timeout: float = 20.0) -> None:
        await eventually(lambda: self.daemon.readiness.role == "active"
                         and self.daemon.readiness.source_subscribed
                         and self.daemon._swept_once, timeout)

    def fired(self, rule: str | None = None) -> list[ActionResult]:
        return [r for r in self.results if rule is None or r.key.rule == rule]


def ledger(conninfo: str, sid: str | None = None) -> list[tuple]:
    sql = "select rule, state, session_id::text from public.listener_ledger"
    if sid:
        return query(conninfo, sql + " where session_id = %s order by due_at", sid)
    return query(conninfo, sql + " order by due_at")
