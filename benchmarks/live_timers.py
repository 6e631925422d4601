"""The daemon on PostgreSQL, measured, next to bare asyncio in the same run.
Prints a table with release 1's figures.

    python benchmarks/live_timers.py [--deadlines 10000 --spread 60 --startup-rows 100000]

- bare asyncio: `deadlines` loop.call_at callbacks spread over `spread`
  seconds, in this process, just before the daemon's run: the floor;
- firing lateness: as many live sessions whose paid time ends at instants
  spread over `spread` seconds; lateness = the claim's fired_at (the ledger's)
  minus due, for plan_time_expiry;
- commit-to-armed: single-row commits, until the engine holds the row;
- start-up: `startup-rows` open sessions in the table, until all are armed.

The daemon is built by the composition root (SqlStore + NotifySource), as
`listener run` builds it. Uses the PostgreSQL server on 127.0.0.1:5432 when
it answers, else pgserver.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    CUSTOMER, admin_conninfo, pct, running_daemon, scratch_database, until_active)
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402

LEAD_S = 8.0  # the first deadline is this far off: the daemon has started by then


async def bare_asyncio(count: int, spread: float) -> list[float]:
    """Lateness (ms) of loop.call_at itself, deadlines spread as the daemon's are."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    done = asyncio.Event()
    rng = random.Random(5)
    start = loop.time() + 1.0

    def fire(when: float) -> None:
        lateness.append((loop.time() - when) * 1000)
        if len(lateness) == count:
            done.set()

    for _ in range(count):
        when = start + rng.random() * spread
        loop.call_at(when, fire, when)
    await done.wait()
    return lateness


async def firing_lateness(conninfo: str, count: int, spread: float) -> list[float]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            "insert into public.sessions (status, customer_user_id, started_at, expires_at) "
            "select 'live', %s, now(), now() + make_interval(secs => %s + random() * %s) "
            "from generate_series(1, %s)", (CUSTOMER, LEAD_S, spread, count))
    done = asyncio.Event()
    lateness: list[float] = []

    def on_result(result) -> None:  # type: ignore[no-untyped-def]
        if result.key.rule != "plan_time_expiry":
            return
        lateness.append((result.fired_at - result.key.due_at) / 1000)
        if len(lateness) >= count:
            done.set()

    async with running_daemon(conninfo, on_result=on_result):
        await asyncio.wait_for(done.wait(), spread + LEAD_S + 120)
    return lateness


async def commit_to_armed(conninfo: str, samples: int) -> list[float]:
    latencies = []
    async with running_daemon(conninfo) as daemon:
        await until_active(daemon)
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
            for _ in range(samples):
                sid = str(uuid.uuid4())
                await conn.execute("insert into public.sessions (id, status, customer_user_id) "
                                   "values (%s, 'pending', %s)", (sid, CUSTOMER))
                committed = time.perf_counter()
                while daemon.engine.row("sessions", sid) is None:
                    await asyncio.sleep(0.0005)
                latencies.append((time.perf_counter() - committed) * 1000)
                await asyncio.sleep(0.01)
    return latencies


async def startup(conninfo: str, rows: int) -> tuple[float, int]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("delete from public.sessions")
        conn.execute("insert into public.sessions (status, customer_user_id, scheduled_for) "
                     "select 'scheduled', %s, now() + interval '3 days' "
                     "from generate_series(1, %s)", (CUSTOMER, rows))
        # As autovacuum would soon: without statistics on the fresh rows the
        # sweep's keyset pages were planned as scans of the whole table.
        conn.execute("analyze public.sessions")
    began = time.perf_counter()
    async with running_daemon(conninfo) as daemon:
        await until_active(daemon, 600)
        elapsed = time.perf_counter() - began
        armed = daemon.engine.armed
    return elapsed, armed


def figures(values: list[float]) -> tuple[str, str, str]:
    return (f"{statistics.median(values):.1f}", f"{pct(values, 99):.1f}", f"{max(values):.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deadlines", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=60.0)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--startup-rows", type=int, default=100_000)
    args = parser.parse_args()
    configure_logging("WARNING")
    rows = [("measure", "p50", "p99", "max", "release 1 (p50 / p99 / max)", "target")]
    with scratch_database(admin_conninfo()) as db:
        bare = await bare_asyncio(args.deadlines, args.spread)
        rows.append((f"bare asyncio call_at, {len(bare):,} deadlines over {args.spread:g} s (ms)",
                     *figures(bare), "", "the floor"))
        late = await firing_lateness(db, args.deadlines, args.spread)
        limit = 1.5 * pct(bare, 99)
        rows.append((f"firing lateness, {len(late):,} deadlines over {args.spread:g} s (ms)",
                     *figures(late), "1.0 / 5.3 / 34",
                     f"p99 <= 1.5 x bare = {limit:.1f}, max <= 20"))
        armed = await commit_to_armed(db, args.samples)
        rows.append((f"commit to armed, {len(armed)} single-row commits (ms)", *figures(armed),
                     "1.5 / 1.7 / -", "p99 <= 100"))
        if args.startup_rows:
            elapsed, count = await startup(db, args.startup_rows)
            rows.append((f"start-up to all armed, {args.startup_rows:,} open rows (s)",
                         f"{elapsed:.2f}", "", "", "2.85", f"<= 5 ({count:,} timers armed)"))
    print(format_table(rows))


if __name__ == "__main__":
    asyncio.run(main())
