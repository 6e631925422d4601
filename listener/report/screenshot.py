"""The README's picture of the report: ``python -m listener.report.screenshot docs/report.png``.

Fills a throwaway database with a week of a plausible ledger up to now (a
fixed seed: the picture changes only in its dates, unless the page does),
renders the HTML report from it and photographs it with headless Chromium. The database is an embedded
PostgreSQL in a temporary folder, or a scratch database created on the server
given with ``--server`` (a conninfo allowed to create databases) and dropped
afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psycopg

from listener import migrate
from listener.instants import DAY, parse_instant
from listener.report.browser import screenshot
from listener.report.formats import ReportFormat, render
from listener.report.sources import build_report, sql_source

# rule, table, actions a week, share skipped, share failed
DEMO_RULES = (
    ("request_expiry", "sessions", 310, 0.0, 0.004),
    ("mechanic_nudge", "sessions", 260, 0.05, 0.01),
    ("plan_time_expiry", "sessions", 420, 0.0, 0.005),
    ("scheduled_reminder_1h", "sessions", 150, 0.12, 0.01),
    ("summary_reminder", "sessions", 200, 0.0, 0.005),
    ("reservation_expiry", "slot_reservations", 380, 0.0, 0.0),
    ("waitlist_offer_expiry", "waitlist_entries", 140, 0.01, 0.0),
    ("quote_expiry", "repair_quotes", 60, 0.0, 0.03),
)
REASONS = (
    {"email_errors": {"customer": "422 invalid_to_address: 'john@@example.com'"}},
    {"email_errors": {"support": "SUPPORT_EMAIL is not set"}},
    {"why": "webhook answered 503 after 5 attempts"},
)
FINDINGS = (
    {"kind": "duplicate_cron", "severity": "action", "job": "monitor-sessions",
     "message": "pg_cron job calls /api/cron/monitor-sessions, which plan_time_expiry replaces"},
    {"kind": "uncovered_deadline", "severity": "action", "table": "credits",
     "column": "expires_at", "count": 37, "message": "37 rows past a deadline no rule reads"},
    {"kind": "unknown_status", "severity": "info", "table": "sessions", "count": 2,
     "message": "status 'paused' is known to no rule"},
)


def fill_demo_ledger(conninfo: str, until: datetime, seed: int = 7) -> list[dict[str, str]]:
    """A week of actions up to ``until``; an outage on day 5 makes the catch-up late.
    Returns a few upcoming actions for the page."""
    rng = random.Random(seed)
    outage_from = until - timedelta(days=2, hours=7)
    outage_to = outage_from + timedelta(minutes=70)
    rows = []
    for rule, table, per_week, skipped, failed in DEMO_RULES:
        for _ in range(per_week):
            fired = until - timedelta(seconds=rng.uniform(60, 7 * 86400))
            # busier in the day (UTC 8-22), as the marketplace is
            if not 8 <= fired.hour <= 22 and rng.random() < 0.6:
                fired = fired.replace(hour=rng.randint(8, 22))
            lateness = max(0.3, rng.lognormvariate(1.0, 0.6))
            state = "fired"
            detail: dict[str, object] = {"recipients": ["customer"]}
            if outage_from <= fired <= outage_to:
                lateness = (outage_to - fired).total_seconds() * 1000 + rng.uniform(5, 40)
                state = "late" if lateness > 3_600_000 else "fired"
                fired = outage_to + timedelta(milliseconds=rng.uniform(5, 400))
            roll = rng.random()
            if roll < skipped:
                state, detail = "skipped", {"why": "row moved on", "now": "cancelled"}
            elif roll < skipped + failed:
                state, detail = "failed", rng.choice(REASONS)
                lateness += rng.uniform(200, 3000)
            if fired > until:
                continue
            key = str(uuid.uuid4())
            due = fired - timedelta(milliseconds=lateness)
            rows.append((rule, table, key, key if table == "sessions" else None, due, state,
                         fired, round(lateness), json.dumps(detail)))
    with psycopg.connect(conninfo) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "insert into public.listener_ledger (rule, table_name, row_key, session_id, "
                "due_at, state, holder, fencing_token, claimed_at, fired_at, completed_at, "
                "lateness_ms, detail) values (%s, %s, %s, %s, %s, %s, 'srv-7f2c', 12, %s, %s, "
                "%s, %s, %s)",
                [(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[6], r[6], r[7], r[8]) for r in rows])
        stuck = until - timedelta(minutes=9)
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at, "
            "state, holder, fencing_token, claimed_at, fired_at, attempts, status_applied) "
            "values ('plan_time_expiry', 'sessions', %s, %s, %s, 'claimed', 'srv-5d01', 11, %s, "
            "%s, 2, true)", (str(uuid.UUID(int=rng.getrandbits(128))),) * 2 + (stuck,) * 3)
        conn.execute(
            "insert into public.listener_lease (name, holder, fencing_token, expires_at, "
            "acquired_at, renewed_at) values ('listener', 'srv-7f2c', 12, "
            "now() + interval '12 seconds', %s, now() - interval '3 seconds') "
            "on conflict (name) do update set holder = excluded.holder, "
            "fencing_token = excluded.fencing_token, expires_at = excluded.expires_at, "
            "acquired_at = excluded.acquired_at, renewed_at = excluded.renewed_at",
            (outage_to,))
        conn.execute("select public.listener_note_reconcile_v1('srv-7f2c', %s, 0)",
                     (until - timedelta(seconds=41),))
    soon = [("scheduled_reminder_1h", "sessions", 14), ("reservation_expiry",
             "slot_reservations", 22), ("plan_time_expiry", "sessions", 48),
            ("quote_expiry", "repair_quotes", 300), ("summary_reminder", "sessions", 760)]
    return [{"at": (until + timedelta(minutes=m)).isoformat(), "rule": r,
             "table": t, "row_id": str(uuid.UUID(int=rng.getrandbits(128)))} for r, t, m in soon]


@contextmanager
def throwaway_database(server: str | None) -> Iterator[str]:
    if server is None:
        import warnings

        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="listener-shot-") as d:
            warnings.simplefilter("ignore")
            import pgserver

            pg = pgserver.get_server(d, cleanup_mode="delete")
            try:
                yield pg.get_uri()
            finally:
                pg.cleanup()
        return
    name = f"listener_shot_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        yield psycopg.conninfo.make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m listener.report.screenshot",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path, help="where to write the PNG (e.g. docs/report.png)")
    parser.add_argument("--server", help="PostgreSQL conninfo allowed to create databases "
                        "(default: an embedded PostgreSQL in a temporary folder)")
    parser.add_argument("--html", type=Path, help="also keep the rendered page here")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=2200)
    args = parser.parse_args(argv)

    # the lease and the claim's age are read against the database's clock
    until = datetime.now(timezone.utc).replace(microsecond=0)
    with throwaway_database(args.server) as conninfo:
        migrate.apply(conninfo, include_reference=True)
        upcoming = fill_demo_ledger(conninfo, until)
        end = parse_instant(until) or 0
        report = asyncio.run(build_report(sql_source(conninfo), end - 7 * DAY, end,
                                          upcoming=upcoming, findings=FINDINGS))
    page = render(report, ReportFormat.HTML)
    with tempfile.TemporaryDirectory(prefix="listener-shot-page-") as folder:
        html = args.html or Path(folder) / "report.html"
        html.write_text(page, encoding="utf-8")
        screenshot(html, args.png, width=args.width, height=args.height)
    print(f"{args.png}: {args.png.stat().st_size // 1024} KB, {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
