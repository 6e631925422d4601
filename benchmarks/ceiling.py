"""The ceiling of one daemon on PostgreSQL: sustained committed changes per
second against commit-to-armed latency and the change backlog. Prints a table.

    python benchmarks/ceiling.py [--rates 500,1000,2000,5000 --seconds 12 --writers 32]

Writer processes (separate from the daemon's, several connections each)
commit a mix of inserts and updates of sessions and slot_reservations, one
row per transaction, paced to the rate; each records its transaction id
(the row version the NOTIFY carries) and the wall time the commit returned.
The daemon is the real one (composition root, SqlStore + NotifySource); the
time a row version is armed is when Term._upsert has applied it to the
engine. Commit to armed is split at the instant the daemon took the change
from its source (Term.put): before it, the database's NOTIFY and the
operating system; after it, the daemon. The backlog is the daemon's change
queue, sampled every 50 ms; the daemon's CPU time per change is its process's
(the writers run in processes of their own); the load average is the
machine's at the end of each rate.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    CUSTOMER, MECHANIC, admin_conninfo, pct, running_daemon, scratch_database, until_active)
from listener import daemon as daemon_module  # noqa: E402
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402

# The commit's time is the database's clock at the end of the statement (the
# same machine's clock as the daemon's): a busy writer process reads its own
# clock late, which made latencies look shorter than they are.
RETURNING = ("returning id::text, pg_current_xact_id()::xid::text, "
             "extract(epoch from clock_timestamp())::float8")
INSERT_SESSION = ("insert into public.sessions (status, customer_user_id) values ('pending', %s) "
                  + RETURNING)
UPDATE_SESSION = ("update public.sessions set status = case status when 'pending' then "
                  "'scheduled' else 'pending' end, scheduled_for = now() + interval '2 days' "
                  "where id = %s " + RETURNING)
# Distinct one-minute slots per writer: the app forbids overlapping holds of a mechanic.
INSERT_RESERVATION = (
    "insert into public.slot_reservations (mechanic_id, start_time, end_time, expires_at) "
    "values (%s, timestamptz '2030-01-01' + make_interval(mins => %s), "
    "timestamptz '2030-01-01' + make_interval(mins => %s + 1), now() + interval '1 hour') "
    + RETURNING)
UPDATE_RESERVATION = ("update public.slot_reservations set expires_at = now() + interval "
                      "'1 hour' + make_interval(secs => %s) where id = %s " + RETURNING)


async def _connection(conninfo: str, slot: int, rate: float, seconds: float,
                      out: list[tuple[str, str, str, float]]) -> None:
    sessions: list[str] = []
    reservations: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        # This machine's disk, not the listener, would set the rate: commits here
        # do not wait for the WAL flush (a hosted database's disk is faster).
        await conn.execute("set synchronous_commit = off")
        began = time.perf_counter()
        i = 0
        while True:
            due = began + i / rate
            now = time.perf_counter()
            if due - began > seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            kind = i % 4
            if kind == 0:
                cur = await conn.execute(INSERT_SESSION, (CUSTOMER,))
                table = "sessions"
            elif kind == 1:
                minute = slot * 1_000_000 + i
                cur = await conn.execute(INSERT_RESERVATION, (MECHANIC, minute, minute))
                table = "slot_reservations"
            elif kind == 2:
                cur = await conn.execute(UPDATE_SESSION, (sessions[(i * 7919) % len(sessions)],))
                table = "sessions"
            else:
                cur = await conn.execute(UPDATE_RESERVATION, (
                    i % 600, reservations[(i * 7919) % len(reservations)]))
                table = "slot_reservations"
            key, version, committed = await cur.fetchone()  # type: ignore[misc]
            out.append((table, key, version, committed))
            if kind == 0:
                sessions.append(key)
            elif kind == 1:
                reservations.append(key)
            i += 1


def _writer(conninfo: str, first_slot: int, connections: int, rate: float, seconds: float,
            path: str) -> None:
    out: list[tuple[str, str, str, float]] = []

    async def run() -> None:
        await asyncio.gather(*(_connection(conninfo, first_slot + c, rate, seconds, out)
                               for c in range(connections)))

    asyncio.run(run())
    with open(path, "wb") as fh:
        pickle.dump(out, fh)


async def one_rate(daemon, conninfo: str, rate: int, seconds: float, writers: int,  # type: ignore[no-untyped-def]
                   armed: dict[tuple[str, str, str], float],
                   received: dict[tuple[str, str, str], float], slot_base: int) -> dict:
    processes = max(1, min(writers // 8, os.cpu_count() or 1))
    per_process = max(1, writers // processes)
    per_connection = rate / (processes * per_process)
    files = [tempfile.mktemp(prefix="listener-ceiling-") for _ in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(conninfo, slot_base + p * per_process,
                                               per_process, per_connection, seconds, files[p]))
             for p in range(processes)]
    backlog: list[int] = []
    cpu = time.process_time()
    for proc in procs:
        proc.start()
    loop = asyncio.get_running_loop()
    while any(p.is_alive() for p in procs):
        backlog.append(daemon.term._changes.qsize())
        await asyncio.sleep(0.05)
    drained = loop.time()
    while daemon.term._changes.qsize() and loop.time() - drained < 60:
        backlog.append(daemon.term._changes.qsize())
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    cpu = time.process_time() - cpu
    load = os.getloadavg()[0]
    commits: list[tuple[str, str, str, float]] = []
    for path in files:
        with open(path, "rb") as fh:
            commits += pickle.load(fh)
        os.unlink(path)
    latencies = [(armed[(t, k, v)] - at) * 1000 for t, k, v, at in commits if (t, k, v) in armed]
    to_daemon = [(received[(t, k, v)] - at) * 1000 for t, k, v, at in commits
                 if (t, k, v) in received]
    in_daemon = [(armed[c] - received[c]) * 1000 for c in (tuple(x[:3]) for x in commits)
                 if c in armed and c in received]
    span = max(c[3] for c in commits) - min(c[3] for c in commits) if commits else 1
    return {"rate": rate, "achieved": len(commits) / max(span, 1e-9), "commits": len(commits),
            "missing": len(commits) - len(latencies), "p50": pct(latencies, 50),
            "p99": pct(latencies, 99), "max": max(latencies, default=float("nan")),
            "to_daemon_p99": pct(to_daemon, 99), "in_daemon_p99": pct(in_daemon, 99),
            "cpu_us_per_change": cpu / max(1, len(commits)) * 1e6, "load": load,
            "backlog_max": max(backlog, default=0),
            "backlog_mean": statistics.fmean(backlog) if backlog else 0}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="500,1000,2000,5000")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--writers", type=int, default=32,
                        help="writer connections (in up to one process per core)")
    parser.add_argument("--profile", help="write a cProfile of the daemon's process here")
    args = parser.parse_args()
    configure_logging("WARNING")
    armed: dict[tuple[str, str, str], float] = {}
    received: dict[tuple[str, str, str], float] = {}
    upsert = daemon_module.Term._upsert
    put = daemon_module.Term.put

    def timed_put(self, change):  # type: ignore[no-untyped-def]
        if change.record is not None and change.record.get("_version") is not None:
            received.setdefault((change.table, change.key, change.record["_version"]),
                                time.time())
        return put(self, change)

    def timed_upsert(self, table, key, row):  # type: ignore[no-untyped-def]
        result = upsert(self, table, key, row)
        version = row.get("_version")
        if version is not None:
            armed.setdefault((table, key, version), time.time())
        return result

    daemon_module.Term._upsert = timed_upsert  # type: ignore[method-assign]
    daemon_module.Term.put = timed_put  # type: ignore[method-assign]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    results = []
    with scratch_database(admin_conninfo()) as conninfo:
        async with running_daemon(conninfo) as daemon:
            await until_active(daemon)
            if profiler is not None:
                profiler.enable()
            for n, rate in enumerate(int(r) for r in args.rates.split(",")):
                results.append(await one_rate(daemon, conninfo, rate, args.seconds,
                                              args.writers, armed, received, n * 100))
                print(f"  {rate}/s: {results[-1]}", file=sys.stderr, flush=True)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
    rows = [("target rate (changes/s)", "achieved", "commit to armed p50 / p99 / max (ms)",
             "p99 to daemon / in daemon (ms)", "daemon CPU per change (us)", "load",
             "backlog max / mean", "not armed", "release 1", "target")]
    for r in results:
        rows.append((f"{r['rate']:,}", f"{r['achieved']:,.0f}",
                     f"{r['p50']:.1f} / {r['p99']:.1f} / {r['max']:.1f}",
                     f"{r['to_daemon_p99']:.1f} / {r['in_daemon_p99']:.1f}",
                     f"{r['cpu_us_per_change']:.0f}", f"{r['load']:.1f}",
                     f"{r['backlog_max']:,} / {r['backlog_mean']:,.0f}", f"{r['missing']:,}",
                     "p50 1.5, p99 1.7 (single commits)",
                     "p99 <= 100 at 2,000/s" if r["rate"] == 2000 else ""))
    print(format_table(rows))


if __name__ == "__main__":
    asyncio.run(main())
