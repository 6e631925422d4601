"""`listener run`, `migrate` and `plan` through the command line, on PostgreSQL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Iterator

import psycopg
import pytest

from tests.conftest import scratch_database
from tests.live import MECHANIC, insert_session, query, seed_people


def listener(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("RULE", "DATABASE_URL", "SUPABASE", "MQTT", "RESEND"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "listener", *args], capture_output=True,
                          text=True, env=full, timeout=120)


@pytest.fixture
def unmigrated(pg_admin: str) -> Iterator[str]:
    """A database without the migrations, dropped after the test."""
    with scratch_database(pg_admin, "listener_e_") as conninfo:
        yield conninfo


def test_run_refuses_an_unreachable_database() -> None:
    result = listener("run", DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("listener: database unreachable")


def test_run_refuses_a_database_without_migrations(unmigrated: str) -> None:
    result = listener("run", DATABASE_URL=unmigrated)
    assert result.returncode == 2
    assert "run `listener migrate`" in result.stderr.strip().splitlines()[-1]


def test_run_refuses_a_bad_mqtt_url(database: str) -> None:
    result = listener("run", DATABASE_URL=database, MQTT_URL="http://broker")
    assert result.returncode == 2 and "MQTT_URL" in result.stderr.strip().splitlines()[-1]


def test_migrate_then_run_requirements_met(unmigrated: str) -> None:
    first = listener("migrate", "--reference", DATABASE_URL=unmigrated)
    assert first.returncode == 0 and "0003_functions.sql" in first.stdout
    again = listener("migrate", DATABASE_URL=unmigrated)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_printed_sql_runs_twice_in_a_fresh_database(unmigrated: str) -> None:
    script = listener("migrate", "--print", "--reference").stdout
    assert script.startswith("--") and "listener_fire" in script
    with psycopg.connect(unmigrated, autocommit=True) as conn:
        conn.execute(script)
        conn.execute(script)
    names = [n for (n,) in query(unmigrated, "select name from public.listener_migrations "
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
