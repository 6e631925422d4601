"""`listener demo`: the daemon on the embedded database, plus a simulator that
plays session lifecycles with every threshold scaled down, until every rule
has fired; then a summary table."""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import psycopg
from psycopg.types.json import Jsonb

from listener.executor import ActionResult
from listener.instants import HOUR, MINUTE
from listener.settings import Settings
from listener.tables import format_table
from listener.rules.table import RuleTable

DEMO_SCALE = 1440  # one day of rules in one minute
CUSTOMER = "22222222-2222-4222-8222-222222222222"
MECHANIC = "11111111-1111-4111-8111-111111111111"


def demo_database(data_dir: Path) -> str:
    """A fresh `listener_demo` database in the embedded server, migrated."""
    from listener import migrate
    from listener.runtime import embedded_conninfo

    admin = embedded_conninfo(data_dir)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("drop database if exists listener_demo with (force)")
        conn.execute("create database listener_demo")
    base, _, query = admin.partition("?")
    conninfo = base.rsplit("/", 1)[0] + "/listener_demo" + ("?" + query if query else "")
    migrate.apply(conninfo, include_reference=True)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into auth.users (id, email) values (%s, 'carla@example.com')",
                     (CUSTOMER,))
        conn.execute("insert into public.profiles (id, full_name) values (%s, 'Carla Diaz')",
                     (CUSTOMER,))
        conn.execute("insert into public.mechanics (id, name, email) values "
                     "(%s, 'Mo Khan', 'mo@example.com')", (MECHANIC,))
    return conninfo


class Simulator:
    """Writes lifecycles into public.sessions as the app would, on scaled time."""

    def __init__(self, conninfo: str, scale: float) -> None:
        self.conninfo = conninfo
        self.scale = scale

    def seconds(self, micros: int) -> float:
        return micros / 1e6 / self.scale

    async def sleep(self, micros: int) -> None:
        await asyncio.sleep(self.seconds(micros))

    def later(self, micros: int) -> str:
        return f"now() + interval '{self.seconds(micros):.3f} seconds'"

    async def write(self, sql: str, *params: Any) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await conn.execute(sql, params)

    async def insert(self, status: str, **columns: Any) -> str:
        sid = str(uuid.uuid4())
        columns = {"id": sid, "status": status, "customer_user_id": CUSTOMER,
                   "metadata": Jsonb({"source": "demo"}), **columns}
        exprs = {k: v for k, v in columns.items() if isinstance(v, str) and v.startswith("now()")}
        values = {k: v for k, v in columns.items() if k not in exprs}
        names = ", ".join([*values, *exprs])
        marks = ", ".join(["%s"] * len(values) + list(exprs.values()))
        await self.write(f"insert into public.sessions ({names}) values ({marks})",
                         *values.values())
        return sid

    async def update(self, sid: str, **columns: Any) -> None:
        sets = ", ".join(f"{k} = {v}" if isinstance(v, str) and v.startswith("now()")
                         else f"{k} = %s" for k, v in columns.items())
        params = [v for v in columns.values() if not (isinstance(v, str) and v.startswith("now()"))]
        await self.write(f"update public.sessions set {sets} where id = %s", *params, sid)

    # -- the lifecycles ------------------------------------------------------------------

    async def nobody_accepts(self) -> None:
        await self.insert("pending", type="chat")

    async def slow_mechanic_then_extension(self) -> None:
        sid = await self.insert("pending")
        await self.sleep(1 * MINUTE)
        await self.update(sid, status="waiting", mechanic_id=MECHANIC)
        await self.sleep(6 * MINUTE)
        await self.update(sid, status="live", started_at="now()", expires_at=self.later(30 * MINUTE))
        await self.sleep(20 * MINUTE)
        await self.update(sid, expires_at=self.later(25 * MINUTE))  # a paid extension

    async def mechanic_never_starts(self) -> None:
        await self.insert("waiting", mechanic_id=MECHANIC, type="diagnostic")

    async def connection_drops(self) -> None:
        sid = await self.insert("live", mechanic_id=MECHANIC, started_at="now()")
        await self.sleep(10 * MINUTE)
        await self.update(sid, status="reconnecting")
        await self.sleep(4 * MINUTE)
        await self.update(sid, status="live")
        # No paid end: the 3-hour limit ends it; then the summary is written late.
        await self.sleep(3 * HOUR + 45 * MINUTE)
        await self.update(sid, summary_submitted_at="now()")

    async def booked_no_show(self) -> None:
        sid = await self.insert("scheduled", mechanic_id=MECHANIC,
                                scheduled_for=self.later(24 * HOUR + 20 * MINUTE))
        await self.sleep(24 * HOUR + 15 * MINUTE)
        await self.update(sid, status="waiting")

    async def happy_path(self) -> None:
        sid = await self.insert("pending")
        await self.sleep(30 * 1_000_000)
        await self.update(sid, status="waiting", mechanic_id=MECHANIC)
        await self.sleep(1 * MINUTE)
        await self.update(sid, status="live", started_at="now()", expires_at=self.later(HOUR))
        await self.sleep(20 * MINUTE)
        await self.update(sid, status="completed", ended_at="now()")
        await self.sleep(5 * MINUTE)
        await self.update(sid, summary_submitted_at="now()")

    def lifecycles(self) -> list[Callable[[], Awaitable[None]]]:
        return [self.nobody_accepts, self.slow_mechanic_then_extension,
                self.mechanic_never_starts, self.connection_drops, self.booked_no_show,
                self.happy_path]


def describe(result: ActionResult, started: float) -> str:
    what = []
    if result.status:
        what.append(f"set {result.status} ({result.reason})")
    if result.recipients and result.outcome == "fired":
        what.append("emailed " + ", ".join(result.recipients))
    if result.outcome != "fired":
        what.append(result.outcome)
    return (f"+{time.monotonic() - started:6.1f}s  {result.key.rule:<26} session "
            f"{result.key.session_id[:8]}  late {result.lateness_ms:>4} ms  {'; '.join(what)}")


def summary_table(results: list[ActionResult], table: RuleTable) -> str:
    rows = [("rule", "fired", "p50 lateness", "max lateness")]
    for rule in table:
        mine = [r.lateness_ms for r in results if r.key.rule == rule.name]
        rows.append((rule.name, str(len(mine)),
                     f"{statistics.median(mine):.0f} ms" if mine else "-",
                     f"{max(mine)} ms" if mine else "-"))
    return format_table(rows)


async def run_demo(settings: Settings, table: RuleTable, out: Callable[[str], None],
                   timeout_s: float = 240.0) -> bool:
    from listener.adapters.email_outbox import OutboxSender
    from listener.adapters.source_notify import NotifySource
    from listener.adapters.store_sql import SqlStore
    from listener.clock import WallClock
    from listener.daemon import Daemon, DaemonConfig
    from listener.emails import EmailComposer, EmailDeliverer
    from listener.mailer import Mailer

    conninfo = await asyncio.to_thread(demo_database, settings.listener_data_dir)
    outbox = settings.email_outbox or settings.listener_data_dir / "demo-outbox"
    store = SqlStore(conninfo)
    await store.open()
    results: list[ActionResult] = []
    all_fired = asyncio.Event()
    started = time.monotonic()

    def on_result(result: ActionResult) -> None:
        results.append(result)
        out(describe(result, started))
        if {r.key.rule for r in results} >= {r.name for r in table}:
            all_fired.set()

    composer = EmailComposer(table, settings.next_public_app_url, settings.email_from,
                             settings.support_email or "support@example.com")
    deliverer = EmailDeliverer(store, composer, Mailer(OutboxSender(outbox), rate_per_second=50))
    daemon = Daemon(table, store, NotifySource(conninfo), WallClock(),
                    DaemonConfig(holder="demo"), deliverer=deliverer, on_result=on_result)
    stop = asyncio.Event()
    runner = asyncio.create_task(daemon.run(stop))
    out(f"listener demo: {len(table)} rules, every offset divided by {table.time_scale:g}; "
        f"emails go to {outbox}/")
    sim = Simulator(conninfo, table.time_scale)
    while not (daemon.readiness.role == "active" and daemon.readiness.source_subscribed):
        await asyncio.sleep(0.05)
    plays = [asyncio.create_task(play()) for play in sim.lifecycles()]
    try:
        await asyncio.wait_for(all_fired.wait(), timeout_s)
    except TimeoutError:
        pass
    finally:
        for play in plays:
            play.cancel()
        await asyncio.gather(*plays, return_exceptions=True)
        stop.set()
        await runner
        await store.close()
    out("")
    out(summary_table(results, table))
    missing = [r.name for r in table if r.name not in {x.key.rule for x in results}]
    emails = len(list(Path(outbox).glob("*.json")))
    out(f"\n{len(results)} actions, {emails} emails in {outbox}/, ledger in table "
        f"public.listener_ledger of the embedded database ({settings.listener_data_dir}/pg)")
    if missing:
        out(f"rules that did not fire within {timeout_s:.0f} s: {', '.join(missing)}")
    return not missing
