"""What `listener audit` costs on 1,000,000 sessions: wall time of the whole
audit and of each of its checks, as the reference schema is, then with an
index on session_extensions.session_id, then also on sessions.status.

Makes a scratch database on DATABASE_ADMIN_URL (default the local server on
5432), fills it with the app's mix (most sessions long finished, a few
thousand pending, waiting, live or scheduled, some with paid extensions, a
ledger row for most finished actions), runs the audit as `listener audit`
does (one read-only transaction) and prints a table.

    python benchmarks/audit_million.py [--rows 1000000]
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from listener import migrate  # noqa: E402
from listener.adapters.audit_source import SqlAuditSource  # noqa: E402
from listener.audit import Auditor  # noqa: E402
from listener.rules import load_rules  # noqa: E402
from listener.tables import format_table  # noqa: E402
from tests.conftest import scratch_database  # noqa: E402

FILL = """
alter table public.sessions add column if not exists plan text;
create table if not exists public.session_extensions (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.sessions (id),
    minutes integer not null);
alter table public.sessions disable trigger user;
insert into public.sessions (status, plan, created_at, updated_at, status_changed_at,
                             started_at, ended_at, scheduled_for, mechanic_id,
                             summary_submitted_at)
select s.status,
       (array['chat10', 'video15', 'diagnostic', 'free', 'video90'])[1 + g % 5],
       now() - (g % 400) * interval '1 day', now() - (g % 400) * interval '1 day',
       case when s.status in ('pending', 'waiting', 'live', 'scheduled')
            then now() - (g % 120) * interval '1 minute'
            else now() - (g % 400) * interval '1 day' end,
       case when s.status in ('live', 'completed') then now() - (g % 400) * interval '1 day'
                                                         - interval '2 hours' end,
       case when s.status = 'completed' then now() - (g % 400) * interval '1 day' end,
       case when s.status = 'scheduled' then now() + (g % 72) * interval '1 hour' end,
       null,
       case when s.status = 'completed' then now() - (g % 400) * interval '1 day' end
  from generate_series(1, %(rows)s) g
  cross join lateral (select case
        when g %% 1000 < 2 then 'pending'
        when g %% 1000 < 4 then 'waiting'
        when g %% 1000 < 6 then 'live'
        when g %% 1000 < 10 then 'scheduled'
        when g %% 1000 < 60 then 'cancelled'
        when g %% 1000 < 70 then 'expired'
        else 'completed' end as status) s;
alter table public.sessions enable trigger user;
insert into public.session_extensions (session_id, minutes)
select id, 15 from public.sessions where status in ('live', 'completed') and random() < 0.05;
insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at, state,
                                    holder, fencing_token, claimed_at, completed_at, fired_at,
                                    lateness_ms)
select 'summary_overdue', 'sessions', id::text, id, ended_at + interval '24 hours', 'fired',
       'bench', 1, ended_at + interval '24 hours', ended_at + interval '24 hours',
       ended_at + interval '24 hours', (random() * 20)::int
  from public.sessions where status = 'completed';
analyze;
"""


class TimedSource:
    """The audit's source, timing each call by function."""

    def __init__(self, inner: SqlAuditSource) -> None:
        self.inner = inner
        self.spent: dict[str, float] = {}

    def call(self, call, args):
        started = time.perf_counter()
        try:
            return self.inner.call(call, args)
        finally:
            self.spent[call.function] = (self.spent.get(call.function, 0.0)
                                         + time.perf_counter() - started)

    def close(self) -> None:
        self.inner.close()


def audit_once(conninfo: str) -> tuple[float, dict[str, float], int]:
    ruleset = load_rules({})
    source = TimedSource(SqlAuditSource(conninfo, 300_000))
    started = time.perf_counter()
    try:
        report = Auditor(source, ruleset, grace=timedelta(minutes=2),
                         max_notify_lateness=3_600_000_000).run()
    finally:
        source.close()
    return time.perf_counter() - started, source.spent, len(report.findings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--admin", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    args = parser.parse_args()
    with scratch_database(args.admin, "listener_bench_audit_") as conninfo:
        migrate.apply(conninfo, include_reference=True)
        started = time.perf_counter()
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(FILL.replace("%(rows)s", str(args.rows)).replace("%%", "%"))
            size = conn.execute("select pg_size_pretty(pg_total_relation_size('public.sessions'))"
                                ).fetchone()[0]
        fill = time.perf_counter() - started
        runs = {}
        runs["no extra index"] = audit_once(conninfo)
        # The plan end sums a session's extensions: without this index every
        # live session scans the whole extensions table (the sweep too).
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("create index on public.session_extensions (session_id)")
            conn.execute("analyze public.session_extensions")
        runs["+ extensions(session_id)"] = audit_once(conninfo)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("create index on public.sessions (status)")
            conn.execute("analyze public.sessions")
        runs["+ sessions(status)"] = audit_once(conninfo)
    functions = sorted({f for _, spent, _ in runs.values() for f in spent})
    rows = [("measure", *runs)]
    rows.append(("whole audit (s)", *(f"{total:.2f}" for total, _, _ in runs.values())))
    for function in functions:
        rows.append((f"  {function} (s)",
                     *(f"{spent.get(function, 0):.2f}" for _, spent, _ in runs.values())))
    rows.append(("findings", *(str(n) for _, _, n in runs.values())))
    print(f"{args.rows:,} sessions ({size}), filled in {fill:.0f} s\n")
    print(format_table(rows, numbers_right=True))


if __name__ == "__main__":
    main()
