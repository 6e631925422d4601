"""The daemon on PostgreSQL, measured (SPEC section 7). Prints a table.

    python benchmarks/live_timers.py [--deadlines 10000 --spread 60 --startup-rows 100000]

- firing lateness: N sessions whose paid time ends at instants spread over
  `spread` seconds; lateness = claim done minus due (the ledger's fired_at);
- commit-to-armed: single-row commits, until the engine has armed the row;
- start-up: `startup-rows` open sessions in the table, until all are armed.

Uses the PostgreSQL server on 127.0.0.1:5432 when it answers, else pgserver.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from listener import migrate  # noqa: E402
from listener.adapters.source_notify import NotifySource  # noqa: E402
from listener.adapters.store_sql import SqlStore  # noqa: E402
from listener.clock import WallClock  # noqa: E402
from listener.daemon import Daemon, DaemonConfig  # noqa: E402
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402
from listener.rules import load_rules  # noqa: E402


def admin_conninfo() -> str:
    try:
        conninfo = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
        psycopg.connect(conninfo).close()
        return conninfo
    except psycopg.Error:
        import pgserver

        return pgserver.get_server(tempfile.mkdtemp(), cleanup_mode="delete").get_uri()


def fresh_database(admin: str) -> str:
    name = f"listener_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"create database {name}")
    if admin.startswith("postgresql://"):
        base, _, query = admin.partition("?")
        conninfo = base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    else:
        conninfo = admin.replace("dbname=postgres", f"dbname={name}")
    migrate.apply(conninfo, include_reference=True)
    return conninfo


def drop(admin: str, conninfo: str) -> None:
    name = next(w for w in conninfo.replace("/", " ").replace("?", " ").replace("=", " ").split()
                if w.startswith("listener_bench_"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def start(conninfo: str, on_result=None) -> tuple[Daemon, asyncio.Event, asyncio.Task, SqlStore]:
    store = SqlStore(conninfo, max_size=12)
    await store.open()
    daemon = Daemon(load_rules({}), store, NotifySource(conninfo), WallClock(),
                    DaemonConfig(holder="bench"), on_result=on_result)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    return daemon, stop, task, store


async def stop_daemon(stop: asyncio.Event, task: asyncio.Task, store: SqlStore) -> None:
    stop.set()
    await task
    await store.close()


async def firing_lateness(conninfo: str, count: int, spread: float) -> list[float]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "insert into public.sessions (status, started_at, expires_at) "
            "select 'live', now(), now() + make_interval(secs => 8 + random() * %s) "
            "from generate_series(1, %s)", (spread, count))
    done = asyncio.Event()
    lateness: list[float] = []

    def on_result(result) -> None:  # type: ignore[no-untyped-def]
        lateness.append((result.fired_at - result.key.due_at) / 1000)
        if len(lateness) >= count:
            done.set()

    daemon, stop, task, store = await start(conninfo, on_result)
    await asyncio.wait_for(done.wait(), spread + 120)
    await stop_daemon(stop, task, store)
    return lateness


async def commit_to_armed(conninfo: str, samples: int) -> list[float]:
    daemon, stop, task, store = await start(conninfo)
    while not daemon._swept_once:
        await asyncio.sleep(0.05)
    latencies = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        for _ in range(samples):
            sid = str(uuid.uuid4())
            await conn.execute("insert into public.sessions (id, status) values (%s, 'pending')",
                               (sid,))
            committed = time.perf_counter()
            while sid not in daemon.engine.sessions:
                await asyncio.sleep(0.0005)
            latencies.append((time.perf_counter() - committed) * 1000)
            await asyncio.sleep(0.01)
    await stop_daemon(stop, task, store)
    return latencies


async def startup(conninfo: str, rows: int) -> tuple[float, int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("delete from public.sessions")
        conn.execute("insert into public.sessions (status, scheduled_for) "
                     "select 'scheduled', now() + interval '3 days' from generate_series(1, %s)",
                     (rows,))
    began = time.perf_counter()
    daemon, stop, task, store = await start(conninfo)
    while not daemon._swept_once:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - began
    armed = daemon.engine.armed
    await stop_daemon(stop, task, store)
    return elapsed, armed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadlines", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=60.0)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--startup-rows", type=int, default=100_000)
    args = parser.parse_args()
    configure_logging("WARNING")
    admin = admin_conninfo()
    rows = [("measure", "p50", "p99", "max", "target")]
    db = fresh_database(admin)
    try:
        late = await firing_lateness(db, args.deadlines, args.spread)
        rows.append((f"firing lateness, {len(late):,} deadlines over {args.spread:g} s (ms)",
                     f"{statistics.median(late):.1f}", f"{pct(late, 99):.1f}",
                     f"{max(late):.1f}", "p99 <= 15, max <= 100"))
        armed = await commit_to_armed(db, args.samples)
        rows.append((f"commit to armed, {len(armed)} single-row commits (ms)",
                     f"{statistics.median(armed):.1f}", f"{pct(armed, 99):.1f}",
                     f"{max(armed):.1f}", "p99 <= 100"))
        elapsed, count = await startup(db, args.startup_rows)
        rows.append((f"start-up to all armed, {args.startup_rows:,} open rows (s)",
                     f"{elapsed:.2f}", "", "", f"<= 5 ({count:,} timers armed)"))
    finally:
        drop(admin, db)
    print(format_table(rows))


if __name__ == "__main__":
    asyncio.run(main())
