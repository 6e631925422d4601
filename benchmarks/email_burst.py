"""Email bursts: 1,000 emails due in the same second, at 5 requests/s. Prints a table.

    python benchmarks/email_burst.py

500 actions (an appointment's reminder to its customer and its mechanic) fall
due within one second; each is claimed in the ledger (PostgreSQL), and its
two emails go through the Mailer, frozen in batches by
`listener_batch_freeze_v1`, to the local Resend stand-in at 5 requests/s.

- burst: one instance sends them all;
- kill -9: an instance in a child process sends them and is killed with
  SIGKILL once its third batch request is in; a new instance then re-runs
  every claim (the recovery re-runs unfinished claims), which re-sends the
  frozen batches under their keys and batches the rest.

Measured: seconds from the first due instant until every email is delivered,
emails delivered, emails delivered more than once, requests, 429s. Release 1
sent one request per email: 1,000 / 5 = 200 s.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
import structlog  # noqa: E402
from psycopg.types.json import Jsonb  # noqa: E402

from listener import migrate  # noqa: E402
from listener.adapters.email_resend import ResendSender  # noqa: E402
from listener.effects import OutgoingEmail  # noqa: E402
from listener.email_batch import frozen_batches  # noqa: E402
from listener.mailer import Mailer, Member  # noqa: E402
from listener.tables import format_table  # noqa: E402
from benchmarks.harness import admin_conninfo, with_dbname  # noqa: E402
from tests.servers.resend_server import ResendServer  # noqa: E402

KEY = "re_bench_burst"
HOLDER, TOKEN = "bench", 1
ACTIONS = 500
RATE = 5.0
DUE = "2026-03-02T10:00:00Z"


def actions(run: str) -> list[tuple[Member, list[OutgoingEmail]]]:
    out = []
    for n in range(ACTIONS):
        sid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{n}"))
        member = Member("scheduled_reminder_1h", "sessions", sid, DUE)
        out.append((member, [OutgoingEmail(
            to=f"{role}{n}@example.com", sender="The Auto Doctor <noreply@example.com>",
            subject=f"Session {sid[:8]} starts in 1 hour", html="<p>Soon</p>", text="Soon",
            idempotency_key=f"listener/{member.rule}/{sid}/{DUE}/{role}",
            rule=member.rule, table="sessions", row_id=sid, role=role)
            for role in ("customer", "mechanic")]))
    return out


def claim(conninfo: str, run: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into public.listener_lease (name, holder, fencing_token, expires_at) "
                     "values ('listener', %s, %s, now() + interval '1 hour') on conflict (name) "
                     "do nothing", (HOLDER, TOKEN))
        generic = conn.execute("select exists (select 1 from pg_attribute where attrelid = "
                               "'public.listener_ledger'::regclass and attname = 'row_key')"
                               ).fetchone()[0]
        with conn.cursor() as cur:
            for member, _ in actions(run):
                if generic:
                    cur.execute("insert into public.listener_ledger (rule, table_name, row_key, "
                                "session_id, due_at, holder, fencing_token) values "
                                "(%s, 'sessions', %s, %s::uuid, %s, %s, %s)",
                                (member.rule, member.row_key, member.row_key, DUE, HOLDER, TOKEN))
                else:
                    cur.execute("insert into public.listener_ledger (rule, session_id, due_at, "
                                "holder, fencing_token) values (%s, %s::uuid, %s, %s, %s)",
                                (member.rule, member.row_key, DUE, HOLDER, TOKEN))


class SqlFreeze:
    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()

    async def __call__(self, key, payload, members, supersedes):
        async with self.lock:
            cur = await self.conn.execute(
                "select public.listener_batch_freeze_v1(p_batch_key => %s, p_payload => %s, "
                "p_members => %s, p_holder => %s, p_token => %s, p_supersedes => %s)",
                (key, Jsonb(payload), Jsonb(members), HOLDER, TOKEN, supersedes))
            (answer,) = await cur.fetchone()
        return frozen_batches(answer)


async def send_all(conninfo: str, url: str, run: str) -> list[list[str | None]]:
    """One instance: the burst's actions asked for over one second, as they fall due."""
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    sender = ResendSender(KEY, url)
    mailer = Mailer(sender, rate_per_second=RATE, freeze=SqlFreeze(conn))

    async def one(i: int, member: Member, emails: list[OutgoingEmail]):
        await asyncio.sleep(i / ACTIONS)  # due within the same second
        return await mailer.send(member, emails)

    try:
        return await asyncio.gather(*(one(i, m, e) for i, (m, e) in enumerate(actions(run))))
    finally:
        await mailer.aclose()
        await sender.aclose()
        await conn.close()


def figures(server: ResendServer, elapsed: float, results) -> list[str]:
    failed = sum(r is not None for rs in results for r in rs)
    dupes = sum(n - 1 for n in server.duplicates().values())
    return [f"{elapsed:.2f}", str(len(server.delivered)), str(dupes), str(failed),
            str(len(server.requests)), str(server.count(429))]


async def bench_burst(conninfo: str, server: ResendServer) -> list[str]:
    run = f"burst-{uuid.uuid4().hex[:6]}"
    claim(conninfo, run)
    server.reset()
    t0 = time.monotonic()
    results = await send_all(conninfo, server.url, run)
    return figures(server, time.monotonic() - t0, results)


async def bench_kill(conninfo: str, server: ResendServer) -> list[str]:
    run = f"kill-{uuid.uuid4().hex[:6]}"
    claim(conninfo, run)
    await asyncio.sleep(1.1)  # the previous run's requests out of the rate window
    server.reset()
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, __file__, "--child", conninfo, server.url, run],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(server.requests) < 3:
            if child.poll() is not None:
                raise RuntimeError("the child finished before it could be killed")
            await asyncio.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    killed_after = len(server.delivered)
    results = await send_all(conninfo, server.url, run)  # the new instance
    row = figures(server, time.monotonic() - t0, results)
    row.append(str(killed_after))
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("CONNINFO", "URL", "RUN"))
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    if args.child:
        await send_all(*args.child)
        return
    admin = admin_conninfo()
    name = f"listener_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    conninfo = with_dbname(admin, name)
    try:
        migrate.apply(conninfo, include_reference=True)
        with ResendServer(KEY, rate_limit=int(RATE)) as server:
            burst = await bench_burst(conninfo, server)
            kill = await bench_kill(conninfo, server)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
    rows = [["1,000 emails due in one second, 5 requests/s", "all sent s", "delivered",
             "twice", "failed", "requests", "429s", "sent before kill"],
            ["release 1: one request per email", f"{1000 / RATE:.0f}", "1000", "0", "0",
             "1000", "-", "-"],
            ["release 2: batches of up to 100", *burst, "-"],
            ["release 2: kill -9 after 3 requests, new instance", *kill]]
    print(format_table(rows, numbers_right=True))
    print("target: all within 10 s, none twice (also across a kill -9)")


if __name__ == "__main__":
    asyncio.run(main())
