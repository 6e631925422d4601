"""Apply migrations/ in order, tracked in public.listener_migrations.

Every file is idempotent on its own (safe to paste twice into the Supabase SQL
editor); tracking makes `listener run` able to say what is missing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import psycopg

BOOTSTRAP = """\
create table if not exists public.listener_migrations (
    name        text        primary key,
    checksum    text        not null,
    applied_at  timestamptz not null default now()
);
alter table public.listener_migrations enable row level security;
"""
LOCK = "select pg_advisory_xact_lock(hashtext('listener_migrate'))"


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


def script(include_reference: bool = False) -> str:
    """One SQL script for the Supabase SQL editor (idempotent, records itself)."""
    parts = ["-- The Auto Doctor session listener: migrations. Safe to run more than once.",
             "begin;", BOOTSTRAP]
    for m in reference_migrations() if include_reference else []:
        parts.append(f"-- reference/{m.name} (development only)\n{m.sql.rstrip()}\n")
    for m in listener_migrations():
        parts.append(f"-- {m.name}\n{m.sql.rstrip()}\n")
        parts.append("insert into public.listener_migrations (name, checksum) values "
                     f"('{m.name}', '{m.checksum}') on conflict (name) do update set "
                     "checksum = excluded.checksum, applied_at = now();\n")
    parts.append("commit;")
    return "\n".join(parts) + "\n"


def apply(conninfo: str, include_reference: bool = False) -> list[str]:
    """Apply what is new or changed; return the names applied."""
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
    return applied


def missing(conninfo: str) -> list[str]:
    """Migrations not applied (or changed since), for `run` to refuse to start."""
    with psycopg.connect(conninfo) as conn:
        exists = conn.execute("select to_regclass('public.listener_migrations')").fetchone()[0]
        done = dict(conn.execute("select name, checksum from public.listener_migrations")) \
            if exists else {}
    return [m.name for m in listener_migrations() if done.get(m.name) != m.checksum]
