"""Apply migrations/ in order, tracked in public.listener_migrations, then the
per-table objects the rules need (one `listener_watch_v1` per watched table,
tracked in public.listener_watched).

Every file is idempotent on its own (safe to paste twice into the Supabase SQL
editor); tracking makes `listener run` able to say what is missing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

import orjson
import psycopg

from listener.rules.query import TableQuery

BOOTSTRAP = """\
create table if not exists public.listener_migrations (
    name        text        primary key,
    checksum    text        not null,
    applied_at  timestamptz not null default now()
);
alter table public.listener_migrations enable row level security;
"""
LOCK = "select pg_advisory_xact_lock(hashtext('listener_migrate'))"
WATCH = "select public.listener_watch_v1(%s::jsonb)"
WATCH_CURRENT = "select public.listener_watch_current_v1(%s::jsonb)"


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def _read(package: str) -> list[Migration]:
    folder = resources.files(package)
    return [Migration(f.name, f.read_text(encoding="utf-8"))
            for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".sql")]


def listener_migrations() -> list[Migration]:
    return _read("listener.migrations")


def reference_migrations() -> list[Migration]:
    return _read("listener.migrations.reference")


def watch_json(query: TableQuery) -> dict[str, Any]:
    """What listener_watch_v1 takes: the table's query, with whether a rule
    anchors on status_changed_at (the column and its trigger are then needed)."""
    return {**query.as_json(), "stamps_status": query.stamps_status}


def _watch_text(query: TableQuery) -> str:
    return orjson.dumps(watch_json(query), option=orjson.OPT_SORT_KEYS).decode()


def watch_name(table: str) -> str:
    return f"watch {table}"


def script(include_reference: bool = False,
           queries: Mapping[str, TableQuery] | None = None) -> str:
    """One SQL script for the Supabase SQL editor (idempotent, records itself)."""
    parts = ["-- The listener: migrations. Safe to run more than once.",
             "begin;", BOOTSTRAP]
    for m in reference_migrations() if include_reference else []:
        parts.append(f"-- reference/{m.name} (development only)\n{m.sql.rstrip()}\n")
    for m in listener_migrations():
        parts.append(f"-- {m.name}\n{m.sql.rstrip()}\n")
        parts.append("insert into public.listener_migrations (name, checksum) values "
                     f"('{m.name}', '{m.checksum}') on conflict (name) do update set "
                     "checksum = excluded.checksum, applied_at = now();\n")
    for table, query in (queries or {}).items():
        # A table that does not exist is skipped with a NOTICE: its rules are inactive.
        literal = _watch_text(query).replace("'", "''")
        parts.append(f"-- {watch_name(table)}\nselect public.listener_watch_v1('{literal}'::jsonb);\n")
    parts.append("commit;")
    return "\n".join(parts) + "\n"


def apply(conninfo: str, include_reference: bool = False,
          queries: Mapping[str, TableQuery] | None = None) -> list[str]:
    """Apply what is new or changed; return the names applied (migration files,
    and "watch <table>" for each table whose watch was installed or changed)."""
    applied = []
    with psycopg.connect(conninfo, autocommit=False) as conn:
        with conn.transaction():
            conn.execute(LOCK)
            if include_reference:
                for m in reference_migrations():
                    conn.execute(m.sql)
            conn.execute(BOOTSTRAP)
            done = dict(conn.execute("select name, checksum from public.listener_migrations"))
            for m in listener_migrations():
                if done.get(m.name) == m.checksum:
                    continue
                conn.execute(m.sql)
                conn.execute(
                    "insert into public.listener_migrations (name, checksum) values (%s, %s) "
                    "on conflict (name) do update set checksum = excluded.checksum, "
                    "applied_at = now()", (m.name, m.checksum))
                applied.append(m.name)
            for table, query in (queries or {}).items():
                text = _watch_text(query)
                current = conn.execute(WATCH_CURRENT, (text,)).fetchone()[0]
                if current is None:
                    conn.execute(WATCH, (text,))  # says in a NOTICE that it skips the table
                elif not current:
                    conn.execute(WATCH, (text,))
                    applied.append(watch_name(table))
    return applied


def missing(conninfo: str, queries: Mapping[str, TableQuery] | None = None) -> list[str]:
    """Migrations not applied (or changed since), and watched tables whose
    installed watch differs from the effective query: `run` refuses to start
    and says "run listener migrate". A table that does not exist is not
    missing a watch (its rules are inactive there)."""
    with psycopg.connect(conninfo) as conn:
        exists = conn.execute("select to_regclass('public.listener_migrations')").fetchone()[0]
        done = dict(conn.execute("select name, checksum from public.listener_migrations")) \
            if exists else {}
        out = [m.name for m in listener_migrations() if done.get(m.name) != m.checksum]
        if out:
            return out + [watch_name(t) for t in queries or {}]
        for table, query in (queries or {}).items():
            current = conn.execute(WATCH_CURRENT, (_watch_text(query),)).fetchone()[0]
            if current is False:
                out.append(watch_name(table))
    return out
