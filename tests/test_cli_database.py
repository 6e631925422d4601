"""`listener run`, `migrate` and `plan` through the command line, on PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg

from tests.conftest import with_dbname
from tests.live import MECHANIC, insert_session, query, seed_people


def listener(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("RULE", "DATABASE_URL", "SUPABASE", "MQTT", "RESEND"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "listener", *args], capture_output=True,
                          text=True, env=full, timeout=120)


def empty_database(pg_admin: str) -> str:
    name = f"listener_e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return with_dbname(pg_admin, name)


def test_run_refuses_an_unreachable_database() -> None:
    result = listener("run", DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("listener: database unreachable")


def test_run_refuses_a_database_without_migrations(pg_admin: str) -> None:
    conninfo = empty_database(pg_admin)
    result = listener("run", DATABASE_URL=conninfo)
    assert result.returncode == 2
    assert "run `listener migrate`" in result.stderr.strip().splitlines()[-1]


def test_run_refuses_a_bad_mqtt_url(database: str) -> None:
    result = listener("run", DATABASE_URL=database, MQTT_URL="http://broker")
    assert result.returncode == 2 and "MQTT_URL" in result.stderr.strip().splitlines()[-1]


def test_migrate_then_run_requirements_met(pg_admin: str) -> None:
    conninfo = empty_database(pg_admin)
    first = listener("migrate", "--reference", DATABASE_URL=conninfo)
    assert first.returncode == 0 and "0003_functions.sql" in first.stdout
    again = listener("migrate", DATABASE_URL=conninfo)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_printed_sql_runs_twice_in_a_fresh_database(pg_admin: str) -> None:
    script = listener("migrate", "--print", "--reference").stdout
    assert script.startswith("--") and "listener_fire" in script
    conninfo = empty_database(pg_admin)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(script)
        conn.execute(script)
    names = [n for (n,) in query(conninfo, "select name from public.listener_migrations "
                                           "order by name")]
    assert names[0] == "0001_status_changed_at.sql" and len(names) >= 5


def test_plan_lists_upcoming_actions_soonest_first(database: str) -> None:
    seed_people(database)
    waiting = insert_session(database, status="waiting", mechanic_id=MECHANIC)
    booked = insert_session(database, status="scheduled", scheduled_for="2099-01-01T10:00:00Z")
    result = listener("plan", "--json", DATABASE_URL=database)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [x["due_at"] for x in lines] == sorted(x["due_at"] for x in lines)
    assert (lines[0]["rule"], lines[0]["session_id"]) == ("mechanic_nudge", waiting)
    assert lines[-1]["rule"] == "scheduled_no_show" and lines[-1]["session_id"] == booked
    table = listener("plan", DATABASE_URL=database)
    assert "mechanic_nudge" in table.stdout and "due at" in table.stdout
