"""The operations report: figures computed by PostgreSQL from a ledger of known
content (checked against numbers worked out by hand), the same JSON over
PostgREST RPC, the views closed to the API roles, the HTML page rendered by a
real Chromium, the Markdown and JSON forms, `listener report`, and /report on
the ops endpoint."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import psycopg
import pytest
from PIL import Image

from listener import migrate
from listener.instants import parse_instant
from listener.ops import OpsServer, Readiness
from listener.report import ReportFormat, assemble, figures_over_rpc, figures_over_sql, render
from listener.report.browser import dump_dom, screenshot
from listener.report.sources import ops_page, sql_source, supabase_client
from listener.settings import Settings
from tests.conftest import scratch_database, with_dbname
from tests.servers.postgrest_server import (ANON_KEY, SERVICE_ROLE_KEY, PostgrestServer,
                                            setup_supabase_roles)

SINCE = datetime(2026, 3, 1, tzinfo=timezone.utc)
UNTIL = SINCE + timedelta(days=1)
SCRIPT_REASON = "<script>alert('x')</script> | bounced"


def migrate_like_supabase(conninfo: str) -> None:
    """The API roles and their default grants first, as on Supabase (so the
    migrations' revokes are put to the test), then the schema and migrations."""
    asyncio.run(setup_supabase_roles(conninfo))
    migrate.apply(conninfo, include_reference=True)


@pytest.fixture(scope="module")
def report_template(pg_admin: str) -> Iterator[str]:
    name = f"listener_rt_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        migrate_like_supabase(with_dbname(pg_admin, name))
        yield name
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def ledger_db(pg_admin: str, report_template: str) -> Iterator[str]:
    with scratch_database(pg_admin, "listener_rp_", report_template) as conninfo:
        yield conninfo


def put(conn: psycopg.Connection, rule: str, table: str, state: str, hour: float,
        lateness_ms: int | None, detail: dict[str, Any] | None = None) -> str:
    """One ledger row that fired `hour` hours into the window, `lateness_ms` late."""
    key = str(uuid.uuid4())
    fired = SINCE + timedelta(hours=hour)
    due = fired - timedelta(milliseconds=lateness_ms or 0)
    conn.execute(
        "insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at, "
        "state, holder, fencing_token, claimed_at, fired_at, completed_at, lateness_ms, detail) "
        "values (%s, %s, %s, %s, %s, %s, 'instance-a', 3, %s, %s, %s, %s, %s)",
        (rule, table, key, key if table == "sessions" else None, due, state, fired, fired,
         None if state == "claimed" else fired, lateness_ms, json.dumps(detail or {})))
    return key


def fill_known_ledger(conninfo: str) -> dict[str, str]:
    """request_expiry (sessions): fired 3, 7, 12, 40, 250 ms late; failed at 900 ms.
    reservation_expiry (slot_reservations): fired 1, 1; skipped 5; failed 60 s; late 4000 s.
    Outside the window and unfinished claims are not counted."""
    keys = {}
    with psycopg.connect(conninfo) as conn:
        for hour, late in ((1, 3), (1.5, 7), (2, 12), (5, 40), (23.5, 250)):
            put(conn, "request_expiry", "sessions", "fired", hour, late)
        keys["failed"] = put(conn, "request_expiry", "sessions", "failed", 7, 900,
                             {"recipients": ["customer"],
                              "email_errors": {"customer": SCRIPT_REASON}})
        put(conn, "reservation_expiry", "slot_reservations", "fired", 3, 1)
        put(conn, "reservation_expiry", "slot_reservations", "fired", 3.25, 1)
        put(conn, "reservation_expiry", "slot_reservations", "skipped", 4, 5,
            {"why": "row moved on"})
        put(conn, "reservation_expiry", "slot_reservations", "failed", 8, 60_000,
            {"why": "webhook answered 410"})
        put(conn, "reservation_expiry", "slot_reservations", "late", 6, 4_000_000)
        put(conn, "request_expiry", "sessions", "fired", -0.1, 99_999)   # before the window
        put(conn, "request_expiry", "sessions", "fired", 24, 99_999)     # at its end: excluded
        keys["claimed"] = put(conn, "request_expiry", "sessions", "claimed", 9, None)
        conn.execute("insert into public.listener_lease (name, holder, fencing_token, expires_at, "
                     "acquired_at, renewed_at) values ('listener', 'instance-a', 3, "
                     "now() + interval '15 seconds', now() - interval '1 hour', now())")
    return keys


def instant(dt: datetime) -> int:
    value = parse_instant(dt)
    assert value is not None
    return value


def known_report(conninfo: str, **kw: Any) -> dict[str, Any]:
    raw = asyncio.run(figures_over_sql(conninfo, instant(SINCE), instant(UNTIL)))
    return assemble(raw, **kw)


UPCOMING = [{"at": "2026-03-02T01:00:00Z", "rule": "scheduled_reminder_1h", "table": "sessions",
             "row_id": "5b0c3f1e-0000-4000-8000-000000000001"}]
FINDINGS = [{"kind": "uncovered_deadline", "severity": "info", "message": "no rule reads it",
             "table": "quotes", "column": "valid_until", "count": 0},
            {"kind": "overdue", "severity": "action", "message": "rows owe a rule nothing fired",
             "rule": "reservation_expiry", "table": "slot_reservations", "count": 4}]


# -- the figures -------------------------------------------------------------------------


def test_figures_match_the_ledger_worked_out_by_hand(ledger_db: str) -> None:
    keys = fill_known_ledger(ledger_db)
    report = known_report(ledger_db)
    by_rule = {(r["rule"], r["table"]): r for r in report["rules"]}
    assert set(by_rule) == {("request_expiry", "sessions"),
                            ("reservation_expiry", "slot_reservations")}
    sessions = by_rule["request_expiry", "sessions"]
    assert sessions["outcomes"] == {"fired": 5, "skipped": 0, "late": 0, "failed": 1}
    # sorted 3 7 12 40 250 900; percentile_cont at p*(n-1): 2.5, 4.75, 4.95
    assert sessions["lateness_ms"] == {"p50": 26, "p95": 737.5, "p99": 867.5, "max": 900}
    reservations = by_rule["reservation_expiry", "slot_reservations"]
    assert reservations["outcomes"] == {"fired": 2, "skipped": 1, "late": 1, "failed": 1}
    # sorted 1 1 5 60000 4000000; positions 2, 3.8, 3.96
    assert reservations["lateness_ms"] == {"p50": 5, "p95": 3_212_000, "p99": 3_842_400,
                                           "max": 4_000_000}
    assert report["totals"] == {"fired": 7, "skipped": 1, "late": 1, "failed": 2}

    # buckets: [0,1) [1,2) [2,5) [5,10) [10,20) [20,50) ... [250,500) [500,1000) ...
    # [60 s, 5 min) ... [1 h, up); bucket 0 is early
    assert report["histogram"]["edges_ms"][:4] == [0, 1, 2, 5]
    assert report["histogram"]["edges_ms"][-1] == 3_600_000
    expected = [0] * 18
    for bucket in (3, 4, 5, 6, 9, 10, 2, 2, 4, 15, 17):
        expected[bucket] += 1
    assert report["histogram"]["counts"] == expected
    assert sum(sessions["histogram"]) == 6 and sessions["histogram"][9] == 1

    assert report["step"] == "hour" and len(report["timeline"]) == 24
    per_hour = {slot["at"][11:13]: slot for slot in report["timeline"]}
    assert per_hour["01"]["fired"] == 2 and per_hour["03"]["fired"] == 2
    assert per_hour["07"]["failed"] == 1 and per_hour["06"]["late"] == 1
    assert sum(slot["fired"] for slot in report["timeline"]) == 7

    assert report["failures_total"] == 2
    reasons = {f["row_id"]: f["reason"] for f in report["failures"]}
    assert reasons[keys["failed"]] == f"customer: {SCRIPT_REASON}"
    assert "webhook answered 410" in reasons.values()
    assert [u["row_id"] for u in report["unfinished"]] == [keys["claimed"]]
    assert report["health"]["lease_holder"] == "instance-a"


def test_a_week_is_drawn_per_day_and_an_empty_window_is_refused(ledger_db: str) -> None:
    fill_known_ledger(ledger_db)
    raw = asyncio.run(figures_over_sql(ledger_db, instant(UNTIL - timedelta(days=7)),
                                       instant(UNTIL)))
    assert raw["step"] == "day" and len(raw["timeline"]) == 7
    assert sum(slot["fired"] for slot in raw["timeline"]) == 8  # the one just before SINCE too
    with psycopg.connect(ledger_db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("select public.listener_report_v1(%s, %s)", (UNTIL, SINCE))


async def test_rpc_gives_the_same_json_and_refuses_the_anon_key(ledger_db: str) -> None:
    await asyncio.to_thread(fill_known_ledger, ledger_db)
    over_sql = await figures_over_sql(ledger_db, instant(SINCE), instant(UNTIL))
    async with PostgrestServer(ledger_db) as rest:
        async with supabase_client(rest.url, SERVICE_ROLE_KEY) as service:
            over_rpc = await figures_over_rpc(service, instant(SINCE), instant(UNTIL))
        async with supabase_client(rest.url, ANON_KEY) as anon:
            with pytest.raises(Exception) as refused:
                await figures_over_rpc(anon, instant(SINCE), instant(UNTIL))
        # `listener report` on the Supabase backend: the same figures, through RPC
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "listener", "report", "--since", "2026-02-28T00:00:00Z",
            "--format", "json", env={**clean_env(), "SUPABASE_URL": rest.url,
                                     "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 120)
    assert "permission denied" in str(refused.value)
    assert process.returncode == 0, err.decode()
    through_cli = json.loads(out)
    assert {(r["rule"], r["total"]) for r in through_cli["rules"]} \
        == {("request_expiry", 8), ("reservation_expiry", 5)}  # with the two around the window
    for figures in (over_sql, over_rpc):
        figures.pop("generated_at")
        figures["health"].pop("lease_expires_at")
    assert over_rpc == over_sql


VIEWS = ("listener_report_daily", "listener_report_failures", "listener_report_unfinished",
         "listener_report_health")


def test_views_and_function_are_the_service_roles_only(ledger_db: str) -> None:
    fill_known_ledger(ledger_db)
    with psycopg.connect(ledger_db, autocommit=True) as conn:
        options = dict(conn.execute(
            "select relname, array_to_string(reloptions, ',') from pg_class "
            "where relname = any(%s)", (list(VIEWS),)).fetchall())
        assert all("security_invoker=true" in options[v] for v in VIEWS), options
        for role in ("anon", "authenticated"):
            for relation in VIEWS + ("listener_health",):
                conn.execute(f"set role {role}")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(f"select * from public.{relation}")
                conn.execute("reset role")
            conn.execute(f"set role {role}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("select public.listener_report_v1(now() - interval '1 day', now())")
            conn.execute("reset role")

        conn.execute("set role service_role")
        daily = conn.execute("select rule, table_name, day, fired, failed, lateness_p50_ms "
                             "from public.listener_report_daily order by rule, day").fetchall()
        assert ("request_expiry", "sessions", SINCE.date(), 5, 1, 26) in daily
        unfinished = conn.execute("select count(*) from public.listener_report_unfinished")
        assert unfinished.fetchone() == (1,)
        assert conn.execute("select lease_holder from public.listener_report_health").fetchone() \
            == ("instance-a",)
        conn.execute("reset role")

        # security_invoker: a role allowed the view but not past row level security sees no row
        reader = f"report_reader_{uuid.uuid4().hex[:6]}"
        conn.execute(f"create role {reader} nologin")
        try:
            conn.execute(f"grant select on public.listener_report_unfinished, "
                         f"public.listener_ledger to {reader}")
            conn.execute(f"set role {reader}")
            assert conn.execute("select count(*) from public.listener_report_unfinished"
                                ).fetchone() == (0,)
            conn.execute("reset role")
        finally:
            conn.execute("reset role")
            conn.execute(f"drop owned by {reader}")
            conn.execute(f"drop role {reader}")


# -- the page, in a browser --------------------------------------------------------------


def test_html_page_in_chromium(ledger_db: str, tmp_path: Path) -> None:
    fill_known_ledger(ledger_db)
    report = known_report(ledger_db, upcoming=UPCOMING, findings=FINDINGS)
    page = tmp_path / "report.html"
    html = render(report, ReportFormat.HTML)
    page.write_text(html, encoding="utf-8")

    assert "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html
    assert '<meta name="viewport"' in html and "@media print" in html and "<svg" in html

    dom = dump_dom(page)
    assert "<script" not in dom.lower()
    assert "customer: &lt;script&gt;alert('x')&lt;/script&gt; | bounced" in dom
    for rule in ("request_expiry", "reservation_expiry", "scheduled_reminder_1h"):
        assert rule in dom
    text = " ".join(dom.split())
    assert ("<td>request_expiry</td><td>sessions</td><td class=\"n\">5</td>"
            "<td class=\"n\">0</td><td class=\"n\">0</td><td class=\"n\">1</td>"
            "<td class=\"n\">6</td>") in text.replace("> <", "><")
    assert "<b>7</b><span>fired</span>" in text.replace("> <", "><")
    assert "26 ms" in dom and "738 ms" in dom and "1.1 h" in dom  # p50, p95 and the max late
    assert "rows owe a rule nothing fired" in dom

    png = screenshot(page, tmp_path / "report.png", width=1200, height=2000)
    with Image.open(png) as image:
        assert image.size == (1200, 2000)
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert len(colours) > 50, len(colours)
    # the charts were painted: the outcome colours and the histogram's bars
    for rgb in ("2e7d32", "c62828", "ef8f00", "3d6fb6"):
        assert tuple(bytes.fromhex(rgb)) in colours, rgb


# -- Markdown and JSON -------------------------------------------------------------------


def test_markdown_and_json_forms(ledger_db: str) -> None:
    fill_known_ledger(ledger_db)
    report = known_report(ledger_db, upcoming=UPCOMING, findings=FINDINGS)

    document = json.loads(render(report, ReportFormat.JSON))
    assert {"since", "until", "rules", "failures", "unfinished", "upcoming", "findings"} \
        <= set(document)
    rule = next(r for r in document["rules"] if r["rule"] == "request_expiry")
    assert set(rule) >= {"rule", "table", "outcomes", "lateness_ms"}
    assert set(rule["outcomes"]) == {"fired", "skipped", "late", "failed"}
    assert set(rule["lateness_ms"]) == {"p50", "p95", "p99", "max"}
    assert document["upcoming"] == UPCOMING
    assert [f["severity"] for f in document["findings"]] == ["action", "info"]
    assert set(document["findings"][0]) == {"kind", "severity", "message", "rule", "table",
                                            "column", "count", "job"}

    markdown = render(report, ReportFormat.MARKDOWN)
    assert "| request_expiry | sessions | 5 | 0 | 0 | 1 | 6 |" in markdown
    assert "| reservation_expiry | slot_reservations | 2 | 1 | 1 | 1 | 5 |" in markdown
    assert "<script" not in markdown
    assert "&lt;script&gt;alert('x')&lt;/script&gt; \\| bounced" in markdown
    assert ("| 2026-03-02 01:00:00 | scheduled_reminder_1h | sessions | "
            "5b0c3f1e-0000-4000-8000-000000000001 |") in markdown


def test_bad_upcoming_and_findings_are_refused() -> None:
    from listener.report import ReportError

    raw = {"since": "a", "until": "b", "rules": []}
    with pytest.raises(ReportError, match="row_id"):
        assemble(raw, upcoming=[{"at": "x", "rule": "r", "table": "t"}])
    with pytest.raises(ReportError, match="severity"):
        assemble(raw, findings=[{"kind": "overdue", "message": "m"}])


def test_an_empty_ledger_still_makes_a_report(ledger_db: str) -> None:
    report = known_report(ledger_db)
    assert report["rules"] == [] and report["totals"]["fired"] == 0
    assert "No action finished in this window." in render(report, ReportFormat.HTML)
    assert "Nothing due." in render(report, ReportFormat.MARKDOWN)
    assert json.loads(render(report, ReportFormat.JSON))["histogram"]["counts"] == [0] * 18


# -- the command line --------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RULE", "DATABASE_URL", "SUPABASE", "MQTT", "RESEND", "OPS_"))}


def listener(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = clean_env()
    full.update(env)
    return subprocess.run([sys.executable, "-m", "listener", *args], capture_output=True,
                          text=True, env=full, timeout=120)


def test_listener_report_command(ledger_db: str, tmp_path: Path) -> None:
    with psycopg.connect(ledger_db) as conn:  # fired 2 h ago, 12 ms late
        conn.execute(
            "insert into public.listener_ledger (rule, table_name, row_key, due_at, state, "
            "holder, fencing_token, fired_at, lateness_ms) values ('waitlist_expiry', "
            "'waitlist', 'w1', now() - interval '2 hours', 'fired', 'a', 1, "
            "now() - interval '2 hours' + interval '12 ms', 12)")
    out = tmp_path / "r.json"
    result = listener("report", "--since", "1d", "--format", "json", "--out", str(out),
                      DATABASE_URL=ledger_db)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert [(r["rule"], r["table"], r["outcomes"]["fired"]) for r in document["rules"]] \
        == [("waitlist_expiry", "waitlist", 1)]
    markdown = listener("report", "--format", "md", DATABASE_URL=ledger_db)
    assert markdown.returncode == 0 and "| waitlist_expiry | waitlist | 1 |" in markdown.stdout
    html = listener("report", DATABASE_URL=ledger_db)
    assert html.returncode == 0 and html.stdout.startswith("<!doctype html>")
    bad = listener("report", "--since", "last week", DATABASE_URL=ledger_db)
    assert bad.returncode == 2 and "--since" in bad.stderr
    form = listener("report", "--format", "pdf", DATABASE_URL=ledger_db)
    assert form.returncode == 2 and "--format" in form.stderr


# -- /report on the ops endpoint ---------------------------------------------------------


async def fetch(port: int, path: str, **kw: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        async with client.get(f"http://127.0.0.1:{port}{path}", **kw) as resp:
            return resp.status, await resp.text(), resp.headers


async def test_ops_report_needs_its_token(ledger_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    await asyncio.to_thread(fill_known_ledger, ledger_db)
    page = ops_page(sql_source(ledger_db), lambda: instant(UNTIL),
                    length=instant(UNTIL) - instant(SINCE))

    async with OpsServer(Readiness(), report=page) as off:  # no OPS_TOKEN: as if absent
        unknown = await fetch(off.port, "/nothing-here")
        for path in ("/report", "/report?token=", "/report?token=anything"):
            status, body, _ = await fetch(off.port, path)
            assert (status, body) == unknown[:2] and status == 404

    token = "s3cret-" + uuid.uuid4().hex
    async with OpsServer(Readiness(), report=page, token=token) as on:
        assert (await fetch(on.port, "/report"))[0] == 401
        assert (await fetch(on.port, "/report?token=wrong"))[0] == 401
        wrong = {"Authorization": "Bearer wrong"}
        assert (await fetch(on.port, "/report", headers=wrong))[0] == 401
        status, body, headers = await fetch(on.port, "/report",
                                            headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and "request_expiry" in body and "<script" not in body
        assert headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        status, body, _ = await fetch(on.port, f"/report?token={token}")
        assert status == 200 and "reservation_expiry" in body

    monkeypatch.setenv("OPS_PORT", "0")
    monkeypatch.setenv("OPS_TOKEN", " ")
    assert Settings().ops_token is None
    assert not OpsServer.from_settings(Settings(), Readiness(), report=page).serves_report
    monkeypatch.setenv("OPS_TOKEN", token)
    server = OpsServer.from_settings(Settings(), Readiness(), report=page)
    assert server is not None and server.serves_report
    assert token not in repr(Settings())


def test_chart_labels_are_escaped() -> None:
    from listener.report import svg

    rules = [{"rule": "<b>r</b>", "table": "<script>t</script>", "total": 1,
              "outcomes": {"fired": 1, "skipped": 0, "late": 0, "failed": 0}}]
    drawn = svg.outcomes_by_rule(rules) + svg.actions_over_time(
        [{"at": "<script>", "fired": 1}], svg.Step.HOUR)
    assert "<script" not in drawn and "<b>" not in drawn
    assert "&lt;script&gt;t&lt;/script&gt;" in drawn
