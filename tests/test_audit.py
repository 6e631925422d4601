"""`listener audit` against real databases: the real CLI as a subprocess, a
cluster with the real pg_cron extension, the app's write patterns as SQL."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psycopg
import pytest

from listener import migrate
from tests.conftest import scratch_database

# A stand-in table of checkout holds with its rule, and the stand-in of a
# table with a deadline no rule reads (the app's customer credits).
STAND_INS = """
alter table public.sessions add column if not exists plan text;
create table if not exists public.session_extensions (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.sessions (id),
    minutes integer not null);
create table if not exists public.audit_holds (
    id uuid primary key default gen_random_uuid(),
    status text not null default 'reserved',
    expires_at timestamptz,
    created_at timestamptz not null default now());
create table if not exists public.audit_credits (
    id uuid primary key default gen_random_uuid(),
    status text not null default 'available',
    expires_at timestamptz);
"""

RULES = """
[tables.audit_holds]
key = "id"
status = "status"

[[rule]]
name = "reservation_expiry"
table = "audit_holds"
statuses = ["reserved"]
present = ["expires_at"]
anchor = ["expires_at"]
offset = "0s"
set_status = "expired"
reason = "hold_lapsed"
"""

MONITOR_JOB = ("select net.http_post(url := 'https://app.example.com/api/cron/monitor-sessions', "
               "headers := jsonb_build_object('Authorization', 'Bearer secret'))")
EXPIRE_JOB = "select auto_expire_sessions()"


def prepare(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(STAND_INS)


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "holds.toml"
    path.write_text(RULES, encoding="utf-8")
    return path


@pytest.fixture
def cron_db(pg_cron_cluster) -> str:
    """The pg_cron cluster's database, emptied and migrated afresh for this test
    (pg_cron runs in one database, so tests share it)."""
    conninfo = pg_cron_cluster.conninfo()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # The extension lives in public: it goes and comes back with it.
        conn.execute("drop schema if exists public cascade; create schema public; "
                     "drop schema if exists auth cascade; create extension pg_cron")
    migrate.apply(conninfo, include_reference=True)
    prepare(conninfo)
    return pg_cron_cluster.url


@pytest.fixture
def plain_db(database: str) -> str:
    prepare(database)
    return database


def run_audit(database_url: str, rules_file: Path | None, *args: str,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
                        "RULES_FILE")}
    env["DATABASE_URL"] = database_url
    if rules_file is not None:
        env["RULES_FILE"] = str(rules_file)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "listener", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def findings_of(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)["findings"]


def seed_problems(conninfo: str) -> dict[str, str]:
    """The app's writes, as SQL: a request nobody took an hour ago, a hold that
    lapsed, credits past their expiry, a claim a crashed listener left, and the
    app's pg_cron jobs."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        user = conn.execute("insert into auth.users (email) values ('c@example.com') "
                            "returning id").fetchone()[0]
        # status_changed_at as the migration backfills it for a row older than it.
        session = conn.execute(
            "insert into public.sessions (status, customer_user_id, plan, created_at, updated_at,"
            " status_changed_at) values ('pending', %s, 'chat10', now() - interval '1 hour',"
            " now() - interval '1 hour', now() - interval '1 hour') returning id::text",
            (user,)).fetchone()[0]
        # Three hours old, and the listener expired it on time (its ledger row
        # says so): nothing overdue. The unassigned alert, email only, is too
        # late to owe anything at all.
        acted = conn.execute(
            "insert into public.sessions (status, customer_user_id, created_at, updated_at,"
            " status_changed_at) values ('pending', %s, now() - interval '3 hours',"
            " now() - interval '3 hours', now() - interval '3 hours') returning id",
            (user,)).fetchone()[0]
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at,"
            " state, holder, fencing_token, claimed_at) select 'request_expiry', 'sessions',"
            " id::text, id, status_changed_at + interval '15 minutes', 'failed', 'w', 1,"
            " now() - interval '3 days' from public.sessions where id = %s", (acted,))
        # Plan ends: 30 minutes of chat10 plus a paid extension of 15.
        ended, running = (conn.execute(
            "insert into public.sessions (status, customer_user_id, plan, started_at) values "
            "('live', %s, 'chat10', now() - %s::interval) returning id::text",
            (user, ago)).fetchone()[0] for ago in ("50 minutes", "40 minutes"))
        conn.execute("insert into public.session_extensions (session_id, minutes) "
                     "values (%s, 15), (%s, 15)", (ended, running))
        hold = conn.execute(
            "insert into public.audit_holds (status, expires_at, created_at) values "
            "('reserved', now() - interval '30 minutes', now() - interval '45 minutes') "
            "returning id::text").fetchone()[0]
        conn.execute("insert into public.audit_credits (status, expires_at) "
                     "select 'available', now() - g * interval '1 day' from generate_series(1, 3) g")
        conn.execute("insert into public.audit_credits (status, expires_at) "
                     "values ('available', now() + interval '30 days')")
        live = conn.execute(
            "insert into public.sessions (status, customer_user_id, plan, started_at) values "
            "('live', %s, 'chat10', now() - interval '2 minutes') returning id::text",
            (user,)).fetchone()[0]
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at,"
            " state, holder, fencing_token, claimed_at) values ('plan_time_expiry', 'sessions',"
            " %s, %s::uuid, now() - interval '12 minutes', 'claimed', 'worker-1', 7,"
            " now() - interval '10 minutes')", (live, live))
        jobs = {}
        for name, schedule, command in (("monitor-sessions", "*/5 * * * *", MONITOR_JOB),
                                        ("auto-expire-sessions", "* * * * *", EXPIRE_JOB)):
            jobs[name] = conn.execute("select cron.schedule(%s, %s, %s)",
                                      (name, schedule, command)).fetchone()[0]
    return {"session": session, "hold": hold, "live": live, "ended": ended,
            **{f"job_{k}": str(v) for k, v in jobs.items()}}


def by_kind(findings: list[dict], kind: str) -> list[dict]:
    return [f for f in findings if f["kind"] == kind]


def test_audit_names_every_missing_and_doubled_job(cron_db: str, rules_file: Path) -> None:
    seeded = seed_problems(cron_db)
    result = run_audit(cron_db, rules_file, "--json")
    assert result.returncode == 1, result.stderr
    findings = findings_of(result)
    assert all({"kind", "severity", "message", "advice"} <= f.keys() for f in findings)

    overdue = {f["rule"]: f for f in by_kind(findings, "overdue")}
    assert overdue["request_expiry"]["severity"] == "action"
    assert overdue["request_expiry"]["table"] == "sessions"
    assert overdue["request_expiry"]["count"] == 1
    assert overdue["request_expiry"]["keys"] == [seeded["session"]]
    assert overdue["support_unassigned_alert"]["keys"] == [seeded["session"]]
    assert overdue["plan_time_expiry"]["keys"] == [seeded["ended"]]
    assert overdue["reservation_expiry"]["table"] == "audit_holds"
    assert overdue["reservation_expiry"]["keys"] == [seeded["hold"]]

    uncovered = [f for f in by_kind(findings, "uncovered_deadline") if f["severity"] == "action"]
    assert [(f["table"], f["column"], f["count"]) for f in uncovered] == \
        [("audit_credits", "expires_at", 3)]

    doubled = by_kind(findings, "duplicate_cron")
    monitor = [f for f in doubled if f["job"] == f"pg_cron {seeded['job_monitor-sessions']} "
                                                 "monitor-sessions"]
    assert monitor and "mechanic_nudge" in monitor[0]["rule"]
    assert "support_stuck_alert" in monitor[0]["rule"]
    assert f"cron.unschedule({seeded['job_monitor-sessions']})" in monitor[0]["advice"]
    expire = [f for f in doubled if f["job"].endswith(" auto-expire-sessions")]
    assert expire and expire[0]["rule"] == "plan_time_expiry"

    stuck = by_kind(findings, "stuck_claim")
    assert stuck and stuck[0]["count"] == 1 and stuck[0]["severity"] == "action"
    assert stuck[0]["keys"] == [f"plan_time_expiry/sessions/{seeded['live']}"]

    # Actions come first.
    severities = [f["severity"] for f in findings]
    assert severities == sorted(severities, key=lambda s: s != "action")

    table = run_audit(cron_db, rules_file)
    assert table.returncode == 1
    first = table.stdout.splitlines()[2]  # below the header and its rule
    assert first.split()[:2] == ["1", "action"]
    for text in ("request_expiry", "reservation_expiry", "audit_credits.expires_at",
                 "monitor-sessions", "auto-expire-sessions", "stuck_claim"):
        assert text in table.stdout, text


def test_clean_database_has_no_action(cron_db: str, rules_file: Path) -> None:
    result = run_audit(cron_db, rules_file, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    findings = findings_of(result)
    assert [f for f in findings if f["severity"] == "action"] == []
    report = json.loads(result.stdout)
    assert report["cron"]["installed"] is True and report["cron"]["readable"] is True
    assert {r["rule"] for r in report["rules"] if r["active"]} >= {"request_expiry",
                                                                    "reservation_expiry"}


def test_failed_actions_and_unknown_values_are_reported(plain_db: str, rules_file: Path) -> None:
    with psycopg.connect(plain_db, autocommit=True) as conn:
        # Production may run another CHECK variant than the reference schema's.
        conn.execute("alter table public.sessions drop constraint if exists sessions_status_check")
        conn.execute("insert into public.sessions (status, plan, started_at) values "
                     "('live', 'video90', now()), ('in_progress', 'chat10', now())")
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at,"
            " state, holder, fencing_token, claimed_at, completed_at, detail) select"
            " 'request_expiry', 'sessions', s.id::text, s.id, now() - interval '1 hour',"
            " 'failed', 'w', 1, now() - interval '1 hour', now() - interval '50 minutes',"
            " '{\"why\": \"webhook answered 500\"}' from public.sessions s")
    result = run_audit(plain_db, rules_file, "--json")
    assert result.returncode == 1, result.stderr
    findings = findings_of(result)
    failed = by_kind(findings, "failed_actions")
    assert [(f["rule"], f["count"]) for f in failed] == [("request_expiry", 2)]
    assert "webhook answered 500" in failed[0]["message"]
    assert [(f["column"], f["count"]) for f in by_kind(findings, "unknown_status")] == \
        [("status", 1)]
    assert "in_progress" in by_kind(findings, "unknown_status")[0]["message"]
    plans = by_kind(findings, "unknown_plan")
    assert [(f["column"], f["count"]) for f in plans] == [("plan", 1)]
    assert "video90" in plans[0]["message"] and plans[0]["severity"] == "info"


def test_app_repo_crons_that_double_a_rule(plain_db: str, rules_file: Path,
                                           tmp_path: Path) -> None:
    repo = tmp_path / "app"
    (repo / "scripts").mkdir(parents=True)
    (repo / "vercel.json").write_text(json.dumps({"crons": [
        {"path": "/api/cron/check-scheduled-sessions", "schedule": "* * * * *"},
        {"path": "/api/cron/release-expired-reservations", "schedule": "*/5 * * * *"},
        {"path": "/api/cron/workshop-metrics", "schedule": "0 1 * * *"}]}))
    (repo / "render.yaml").write_text(textwrap.dedent("""\
        services:
          - type: web
            name: theautodoctor
            startCommand: npm start
          - type: cron
            name: session-monitor-cron
            schedule: "*/5 * * * *"
            startCommand: node scripts/run-cron.js
        """))
    (repo / "scripts" / "run-cron.js").write_text(
        "const url = `${APP_URL}/api/cron/monitor-sessions`;\n")
    result = run_audit(plain_db, rules_file, "--json", "--app-repo", str(repo))
    assert result.returncode == 1, result.stderr
    doubled = {f["job"]: f for f in by_kind(findings_of(result), "duplicate_cron")}
    assert set(doubled) == {"vercel /api/cron/check-scheduled-sessions",
                            "vercel /api/cron/release-expired-reservations",
                            "render session-monitor-cron"}
    assert "scheduled_no_show" in doubled["vercel /api/cron/check-scheduled-sessions"]["rule"]
    assert doubled["vercel /api/cron/release-expired-reservations"]["rule"] == \
        "reservation_expiry"
    assert "vercel.json" in doubled["vercel /api/cron/release-expired-reservations"]["advice"]


def test_database_without_migrations_exits_2_with_one_line(pg_admin: str,
                                                          rules_file: Path) -> None:
    with scratch_database(pg_admin, "listener_bare_") as bare:
        result = run_audit(bare, rules_file, "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "run `listener migrate`" in lines[0], result.stderr


def test_unreadable_cron_jobs_are_an_info_finding(cron_db: str, pg_cron_cluster,
                                                  rules_file: Path) -> None:
    with psycopg.connect(pg_cron_cluster.conninfo(), autocommit=True) as conn:
        conn.execute("select cron.schedule('monitor-sessions', '*/5 * * * *', %s)",
                     (MONITOR_JOB,))
        # The function's owner (as on a project where it may not read cron's
        # schema) is a role without any right on it.
        conn.execute("do $$ begin create role audit_no_cron nologin; "
                     "exception when duplicate_object then null; end $$")
        conn.execute("alter function public.listener_audit_cron_v1() owner to audit_no_cron")
    result = run_audit(cron_db, rules_file, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    findings = findings_of(result)
    unreadable = by_kind(findings, "cron_unreadable")
    assert len(unreadable) == 1 and unreadable[0]["severity"] == "info"
    assert "permission denied" in unreadable[0]["message"]
    assert by_kind(findings, "duplicate_cron") == []


async def test_audit_over_supabase_rpc(plain_db: str, rules_file: Path) -> None:
    from importlib import resources

    from tests.servers.postgrest_server import ANON_KEY, SERVICE_ROLE_KEY, PostgrestServer

    with psycopg.connect(plain_db, autocommit=True) as conn:
        conn.execute("insert into public.sessions (status, status_changed_at) values "
                     "('pending', now() - interval '1 hour')")
        conn.execute("insert into public.audit_holds (expires_at) values (now() + interval '1 day')")
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, due_at, state, holder,"
            " fencing_token, claimed_at) values ('reservation_expiry', 'audit_holds', 'h1',"
            " now() - interval '1 hour', 'claimed', 'worker-2', 3, now() - interval '1 hour')")
    async with PostgrestServer(plain_db) as rest:
        # The grants of the audit's migration, now that the API roles exist.
        audit_sql = resources.files("listener.migrations").joinpath("0009_audit.sql")
        with psycopg.connect(plain_db, autocommit=True) as conn:
            conn.execute(audit_sql.read_text(encoding="utf-8"))

        async def audit_with(key: str) -> tuple[int, str, str]:
            env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
            env.update(SUPABASE_URL=rest.url, SUPABASE_SERVICE_ROLE_KEY=key,
                       RULES_FILE=str(rules_file))
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "listener", "audit", "--json", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(process.communicate(), 120)
            return process.returncode, out.decode(), err.decode()

        code, out, err = await audit_with(SERVICE_ROLE_KEY)
        assert code == 1, err
        findings = json.loads(out)["findings"]
        assert [f["count"] for f in by_kind(findings, "overdue")
                if f["rule"] == "request_expiry"] == [1]
        assert [f["keys"] for f in by_kind(findings, "stuck_claim")] == \
            [["reservation_expiry/audit_holds/h1"]]
        assert json.loads(out)["cron"]["installed"] is False
        assert {c.function for c in rest.calls} >= {
            "listener_audit_overdue_v1", "listener_audit_deadline_columns_v1",
            "listener_audit_cron_v1", "listener_audit_ledger_v1", "listener_audit_values_v1"}
        # The anon key may not call any of them.
        code, out, err = await audit_with(ANON_KEY)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err


def test_statement_timeout_is_an_info_finding_naming_the_table(plain_db: str,
                                                               rules_file: Path) -> None:
    locked = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(plain_db) as conn:
            conn.execute("lock table public.audit_holds in access exclusive mode")
            locked.set()
            release.wait(60)
            conn.rollback()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        result = run_audit(plain_db, rules_file, "--json",
                           extra_env={"AUDIT_STATEMENT_TIMEOUT": "1s"})
    finally:
        release.set()
        holder.join()
    assert result.returncode == 0, result.stdout + result.stderr
    findings = findings_of(result)
    timeouts = by_kind(findings, "timeout")
    assert [(f["table"], f["severity"]) for f in timeouts] == [("audit_holds", "info")]
    assert "audit_holds" in timeouts[0]["message"]
    # The other tables were still audited.
    rules = {r["rule"]: r for r in json.loads(result.stdout)["rules"]}
    assert rules["request_expiry"]["owing"] == 0


def test_every_replaced_job_names_a_shipped_rule() -> None:
    from listener.audit import REPLACES
    from listener.rules import load_rules

    shipped = {rule.name for rule in load_rules({}).all_rules}
    assert set(REPLACES) - shipped == set()
