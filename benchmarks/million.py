"""Many tracked rows on PostgreSQL: start-up to all armed, memory per tracked
row, one full sweep. Prints a table.

    python benchmarks/million.py [--small 100000 --large 1000000]

Sessions are inserted with generate_series in statuses that owe actions
(scheduled, its reminders and no-show days ahead), the listener's triggers
off for the bulk load (its stamps written by the insert itself), so the load
is not millions of NOTIFYs. Start-up is from starting the daemon (composition
root, SqlStore + NotifySource) until it holds the lease, is subscribed and its
first sweep has armed every row; memory is the process's resident size
before and after; a sweep is one more full reconcile with everything armed.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    CUSTOMER, admin_conninfo, running_daemon, scratch_database, until_active)
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_BYTES


def load_sessions(conninfo: str, count: int) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("set session_replication_role = replica")  # triggers off for the load
        conn.execute(
            "insert into public.sessions (status, customer_user_id, scheduled_for, "
            "status_changed_at, listener_changed_at) "
            "select 'scheduled', %s, now() + interval '3 days' + make_interval(secs => g %% 86400), "
            "now(), now() from generate_series(1, %s) g", (CUSTOMER, count))
        conn.execute("analyze public.sessions")


async def start_up(conninfo: str, profile: str | None = None) -> dict:
    gc.collect()
    before = rss()
    began = time.perf_counter()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    async with running_daemon(conninfo) as daemon:
        await until_active(daemon, 600)
        elapsed = time.perf_counter() - began
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        gc.collect()
        used = rss() - before
        engine = daemon.engine
        swept = time.perf_counter()
        await daemon.reconcile()
        sweep = time.perf_counter() - swept
        return {"start_up": elapsed, "tracked": engine.tracked, "armed": engine.armed,
                "bytes_per_row": used / max(1, engine.tracked), "sweep": sweep}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--profile", help="cProfile the large start-up into this file")
    args = parser.parse_args()
    configure_logging("WARNING")
    with scratch_database(admin_conninfo()) as conninfo:
        load_sessions(conninfo, args.small)
        small = await start_up(conninfo, None if args.large else args.profile)
        print(f"  {args.small:,}: {small}", file=sys.stderr, flush=True)
        large = None
        if args.large > args.small:
            load_sessions(conninfo, args.large - args.small)
            large = await start_up(conninfo, args.profile)
            print(f"  {args.large:,}: {large}", file=sys.stderr, flush=True)
    rows = [("measure", "value", "release 1", "target")]
    rows.append((f"start-up to all armed, {args.small:,} rows (s)", f"{small['start_up']:.2f}",
                 "2.85", "<= 5"))
    rows.append((f"one full sweep, {args.small:,} rows armed (s)", f"{small['sweep']:.2f}", "", ""))
    if large is not None:
        rows.append((f"start-up to all armed, {args.large:,} rows (s)",
                     f"{large['start_up']:.2f}", "", "<= 30"))
        rows.append((f"one full sweep, {args.large:,} rows armed (s)", f"{large['sweep']:.2f}",
                     "", ""))
        rows.append((f"memory per tracked row, RSS delta ({large['tracked']:,} rows, "
                     f"{large['armed']:,} timers)", f"{large['bytes_per_row']:,.0f} B",
                     "490 B per session", "<= 1,024 B"))
    else:
        rows.append((f"memory per tracked row, RSS delta ({small['tracked']:,} rows)",
                     f"{small['bytes_per_row']:,.0f} B", "490 B per session", "<= 1,024 B"))
    print(format_table(rows))


if __name__ == "__main__":
    asyncio.run(main())
