"""Commit-to-action latency on the Supabase backend: a row whose deadline is
already due is committed in PostgreSQL; Realtime streams it to the daemon
(RealtimeSource), which arms it, fires it at once and acts through PostgREST
RPC (RpcStore: read, claim, compare-and-set, complete). Prints a table.

Runs the real daemon and the real supabase/realtime/postgrest clients against
the Realtime and PostgREST test servers (tests/servers/) on localhost, fed by
the PostgreSQL server on 127.0.0.1:5432 (or an embedded one). On a real
project add the network round trips to Supabase: one for the change, four RPC
calls for a status change (read, claim, transition, complete).

    python benchmarks/realtime_latency.py [--samples 50]
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
from listener.tables import format_table  # noqa: E402
from listener.logs import configure_logging  # noqa: E402
from tests.conftest import _server_conninfo, with_dbname  # noqa: E402
from tests.live import seed_people  # noqa: E402
from tests.live_supabase import LiveSupabaseDaemon, prepare_supabase_database  # noqa: E402
from tests.servers.postgrest_server import SupabaseStack  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def measure(conninfo: str, samples: int) -> dict[str, list[float]]:
    received: dict[str, float] = {}
    acted: dict[str, float] = {}
    waiting: dict[str, asyncio.Event] = {}
    stages: dict[str, list[float]] = {"commit -> change received by the daemon": [],
                                      "commit -> ledger claim (database clock)": [],
                                      "commit -> action recorded (on_result)": []}
    async with SupabaseStack(conninfo) as stack:
        with tempfile.TemporaryDirectory() as outbox:
            live = LiveSupabaseDaemon(stack, Path(outbox), env={"RULES_TIME_SCALE": "600"},
                                      rpc_timeout_s=10.0)
            daemon = live.daemon
            put = daemon.put

            def timed_put(change):  # type: ignore[no-untyped-def]
                received.setdefault(change.session_id, time.perf_counter())
                put(change)

            def on_result(result):  # type: ignore[no-untyped-def]
                if result.key.rule == "plan_time_expiry":
                    acted[result.key.session_id] = time.perf_counter()
                    event = waiting.get(result.key.session_id)
                    if event is not None:
                        event.set()

            daemon.put = timed_put  # type: ignore[method-assign]
            daemon.on_result = on_result
            async with live:
                await live.active()
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    committed: dict[str, tuple[float, object]] = {}
                    for _ in range(samples + 3):  # the first three warm up
                        sid = str(uuid.uuid4())
                        waiting[sid] = asyncio.Event()
                        inserted = conn.execute(
                            "insert into public.sessions (id, customer_user_id, status, type, "
                            "started_at, expires_at) values (%s, %s, 'live', 'video', now(), "
                            "now() - interval '1 second') returning clock_timestamp()",
                            (sid, "22222222-2222-4222-8222-222222222222")).fetchone()[0]
                        committed[sid] = (time.perf_counter(), inserted)
                        await asyncio.wait_for(waiting[sid].wait(), 30)
                        await asyncio.sleep(0.05)
                    claims = dict(conn.execute(
                        "select session_id::text, claimed_at from public.listener_ledger "
                        "where rule = 'plan_time_expiry'").fetchall())
    for sid, (t0, inserted) in list(committed.items())[3:]:
        stages["commit -> change received by the daemon"].append((received[sid] - t0) * 1000)
        stages["commit -> ledger claim (database clock)"].append(
            (claims[sid] - inserted).total_seconds() * 1000)  # type: ignore[operator]
        stages["commit -> action recorded (on_result)"].append((acted[sid] - t0) * 1000)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    configure_logging("WARNING")
    admin, server = _server_conninfo()
    name = f"listener_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    conninfo = with_dbname(admin, name)
    try:
        migrate.apply(conninfo, include_reference=True)
        seed_people(conninfo)
        asyncio.run(prepare_supabase_database(conninfo))
        stages = asyncio.run(measure(conninfo, args.samples))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
    print(f"Commit-to-action latency through Realtime + PostgREST RPC "
          f"({args.samples} samples, test servers on localhost), ms")
    header = ("stage", "p50", "p90", "p99", "max", "mean")
    rows = [header] + [
        (stage, *(f"{v:.1f}" for v in (percentile(values, 50), percentile(values, 90),
                                      percentile(values, 99), max(values),
                                      statistics.fmean(values))))
        for stage, values in stages.items()]
    print(format_table(rows, numbers_right=True))


if __name__ == "__main__":
    main()
