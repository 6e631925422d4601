"""`listener report` on a ledger of 1,000,000 rows: how long PostgreSQL takes to
compute the figures (listener_report_v1) over windows of a day, a week and the
whole month, the admin pages' views, and the whole command's work (figures plus
the HTML page). Prints a table.

    python benchmarks/report_million.py [--rows 1000000] [--server CONNINFO]

It fills a scratch database (created on --server, default the local server on
127.0.0.1:5432, dropped at the end) with generate_series: 30 days of actions
of 14 rules over 4 tables, 2 % skipped, 0.5 % late, 0.3 % failed, 200 claims
left unfinished, lateness log-normal around 3 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from listener import migrate  # noqa: E402
from listener.instants import DAY, parse_instant  # noqa: E402
from listener.report.formats import ReportFormat, render  # noqa: E402
from listener.report.sources import build_report, sql_source  # noqa: E402
from listener.tables import format_table  # noqa: E402

RULES = [("request_expiry", "sessions"), ("mechanic_nudge", "sessions"),
         ("support_unassigned_alert", "sessions"), ("waiting_timeout", "sessions"),
         ("plan_time_expiry", "sessions"), ("session_hard_limit", "sessions"),
         ("scheduled_reminder_24h", "sessions"), ("scheduled_reminder_1h", "sessions"),
         ("scheduled_no_show", "sessions"), ("summary_reminder", "sessions"),
         ("summary_overdue", "sessions"), ("reservation_expiry", "slot_reservations"),
         ("waitlist_offer_expiry", "waitlist_entries"), ("quote_expiry", "repair_quotes")]

FILL = """
insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at, state,
    holder, fencing_token, claimed_at, fired_at, completed_at, lateness_ms, detail)
select r.rule, r.table_name, v.k::text, case when r.table_name = 'sessions' then v.k end,
       v.f - make_interval(secs => v.lat / 1000.0),
       case when v.u < 0.003 then 'failed' when v.u < 0.008 then 'late'
            when v.u < 0.028 then 'skipped' else 'fired' end,
       'bench', 1, v.f, v.f, v.f, v.lat,
       case when v.u < 0.003 then '{"email_errors": {"customer": "422 invalid_to_address"}}'::jsonb
            else '{}'::jsonb end
  -- volatile columns keep this subquery from being flattened: each row draws its own
  from (select g, gen_random_uuid() as k, now() - random() * interval '30 days' as f,
               random() as u,
               -- log-normal around 3 ms (Box-Muller), a long tail
               greatest(0, round(exp(1.1 + 0.7 * sqrt(-2 * ln(1 - random()))
                                     * cos(2 * pi() * random())))::bigint) as lat
          from generate_series(1, %(rows)s) g) v
  join (select ordinality - 1 as i, rule, table_name
          from unnest(%(rules)s::text[], %(tables)s::text[]) with ordinality as t(rule, table_name)
       ) r on r.i = v.g %% %(rule_count)s
 -- the ledger grows in the order actions fire
 order by v.f
"""


def timed(work, repeat: int = 3) -> float:
    """Median wall time of `repeat` runs, in ms (the first run warms the cache)."""
    work()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--server",
                        default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()

    name = f"listener_bench_report_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.server, autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    conninfo = psycopg.conninfo.make_conninfo(args.server, dbname=name)
    try:
        migrate.apply(conninfo, include_reference=True)
        started = time.perf_counter()
        with psycopg.connect(conninfo) as conn:
            conn.execute(FILL, {"rows": args.rows, "rules": [r for r, _ in RULES],
                                "tables": [t for _, t in RULES], "rule_count": len(RULES)})
            conn.execute("update public.listener_ledger set state = 'claimed', completed_at = null "
                         "where ctid in (select ctid from public.listener_ledger "
                         "where state = 'fired' limit 200)")
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("vacuum analyze public.listener_ledger")
            size = conn.execute("select pg_size_pretty(pg_total_relation_size("
                                "'public.listener_ledger'))").fetchone()[0]
        fill_s = time.perf_counter() - started

        rows = [("measure", "rows in window", "median ms")]
        with psycopg.connect(conninfo, autocommit=True) as conn:
            now = conn.execute("select now()").fetchone()[0]
            for label, days in (("report_v1, last 24 h", 1), ("report_v1, last 7 days", 7),
                                ("report_v1, all 30 days", 31)):
                window = (f"now() - interval '{days} days'", "now()")
                in_window = conn.execute(
                    f"select count(*) from public.listener_ledger where fired_at >= {window[0]}"
                ).fetchone()[0]
                ms = timed(lambda: conn.execute(
                    f"select public.listener_report_v1({window[0]}, {window[1]})").fetchone())
                rows.append((label, f"{in_window:,}", f"{ms:,.0f}"))
            for label, query in (
                    ("view daily, last 7 days",
                     "select * from public.listener_report_daily "
                     "where day >= (now() at time zone 'UTC')::date - 7"),
                    ("view failures (7 days)", "select * from public.listener_report_failures"),
                    ("view unfinished", "select * from public.listener_report_unfinished"),
                    ("view health", "select * from public.listener_report_health")):
                ms = timed(lambda: conn.execute(query).fetchall())
                rows.append((label, "", f"{ms:,.0f}"))

        end = parse_instant(now) or 0

        def whole_command() -> None:
            report = asyncio.run(build_report(sql_source(conninfo), end - 7 * DAY, end))
            render(report, ReportFormat.HTML)
        ms = timed(whole_command)
        rows.append(("figures + HTML page, 7 days (the command's work)", "", f"{ms:,.0f}"))
    finally:
        with psycopg.connect(args.server, autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')

    print(f"ledger: {args.rows:,} rows over 30 days, {size} with indexes; filled in {fill_s:.0f} s")
    print(format_table(rows, numbers_right=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
