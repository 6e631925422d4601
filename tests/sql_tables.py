"""Stand-in tables and their queries for the SQL-layer tests: a second table
with its own key and status column (`test_holds`), sessions with a derived
plan end, and a child table read only for the parent's sum."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from listener.instants import MINUTE, HOUR
from listener.rules.model import Recipient, RecipientKind, RecipientSource
from listener.rules.query import TableQuery

TABLES_SQL = """
create table if not exists public.test_holds (
    hold_no bigint primary key,
    state text not null check (state in ('held', 'confirmed', 'expired', 'cancelled')),
    customer_id uuid,
    mechanic_id uuid,
    expires_at timestamptz,
    reminder_sent boolean not null default false,
    updated_at timestamptz not null default now()
);
create table if not exists public.test_hold_events (
    id bigserial primary key,
    event text not null check (event <> 'refused'),
    hold_no bigint,
    created_at timestamptz not null default now()
);
alter table public.sessions add column if not exists plan text;
create table if not exists public.session_extensions (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null,
    minutes integer not null,
    created_at timestamptz not null default now()
);
"""

PLAN_MINUTES = {"chat10": 30, "video15": 45}

HOLD_EXPIRY = {"rule": "hold_expiry", "statuses": ["held"], "present": ["expires_at"],
               "absent": [], "anchors": [{"column": "expires_at"}], "offset_us": 0,
               "horizon_us": None}
# Email only: owes nothing once its anchor is two hours old.
HOLD_REMINDER = {"rule": "hold_reminder", "statuses": ["held", "confirmed"],
                 "present": ["customer_id"], "absent": ["mechanic_id"],
                 "anchors": [{"column": "status_changed_at"}], "offset_us": 10 * MINUTE,
                 "horizon_us": 2 * HOUR}
PLAN_END = {"derived": {
    "start": "started_at",
    "lookups": [{"column": "plan", "map": PLAN_MINUTES, "unit_us": MINUTE}],
    "sums": [{"table": "session_extensions", "column": "minutes", "by": "session_id",
              "unit_us": MINUTE}]}}
PLAN_TIME_EXPIRY = {"rule": "plan_time_expiry", "statuses": ["live", "reconnecting"],
                    "present": [], "absent": [],
                    "anchors": [{"column": "expires_at"}, PLAN_END], "offset_us": 0,
                    "horizon_us": None}
# Email only, on the plan end: a test of the derived arithmetic through the horizon.
PLAN_END_NOTICE = {"rule": "plan_end_notice", "statuses": ["completed"], "present": [],
                   "absent": [], "anchors": [PLAN_END], "offset_us": 0,
                   "horizon_us": 2 * HOUR}

HOLDS = TableQuery(
    "test_holds", "hold_no", "state",
    ("hold_no", "state", "customer_id", "mechanic_id", "expires_at", "reminder_sent",
     "status_changed_at"),
    (HOLD_EXPIRY, HOLD_REMINDER), stamps_status=True)
SESSIONS = TableQuery(
    "sessions", "id", "status",
    ("id", "status", "started_at", "expires_at", "ended_at", "plan", "status_changed_at"),
    (PLAN_TIME_EXPIRY, PLAN_END_NOTICE), stamps_status=True)
EXTENSIONS = TableQuery("session_extensions", "id", None, ("id", "session_id", "minutes"), (),
                        parent={"table": "sessions", "by": "session_id"})
QUERIES = {"test_holds": HOLDS, "sessions": SESSIONS, "session_extensions": EXTENSIONS}

RECIPIENTS = {
    "test_holds": {
        "customer": Recipient("customer", (RecipientSource(RecipientKind.USER, "customer_id"),)),
        "mechanic": Recipient("mechanic", (
            RecipientSource(RecipientKind.MECHANIC, "mechanic_id"),
            RecipientSource(RecipientKind.USER, "customer_id"))),
        "helper": Recipient("helper", (RecipientSource(RecipientKind.USER, "no_such_column"),)),
        "support": Recipient("support", (RecipientSource(RecipientKind.SUPPORT),)),
    },
}

USER = "11111111-1111-4111-8111-111111111111"
MECHANIC = "22222222-2222-4222-8222-222222222222"
MECHANIC_NO_EMAIL = "33333333-3333-4333-8333-333333333333"


def uid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def iso(dt: datetime | str | None) -> str | None:
    if dt is None or isinstance(dt, str):
        return dt
    return dt.isoformat()


def create_tables(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(TABLES_SQL)
        conn.execute("insert into auth.users (id, email) values (%s, 'cust@example.com') "
                     "on conflict do nothing", (USER,))
        conn.execute("insert into public.profiles (id, full_name) values (%s, 'Cus Tomer') "
                     "on conflict do nothing", (USER,))
        conn.execute("insert into public.mechanics (id, name, email) values "
                     "(%s, 'Mec Hanic', 'mech@example.com'), (%s, 'No Mail', null) "
                     "on conflict do nothing", (MECHANIC, MECHANIC_NO_EMAIL))


def insert(conn: psycopg.Connection, table: str, record: dict[str, Any]) -> None:
    names = ", ".join(f'"{k}"' for k in record)
    marks = ", ".join(["%s"] * len(record))
    updates = ", ".join(f'"{k}" = excluded."{k}"' for k in record)
    key = QUERIES[table].key if table in QUERIES else "id"
    conn.execute(f'insert into public."{table}" ({names}) values ({marks}) '
                 f'on conflict ("{key}") do update set {updates}',
                 [iso(v) if isinstance(v, datetime) else v for v in record.values()])


def ago(**kw: float) -> datetime:
    return now() - timedelta(**kw)
