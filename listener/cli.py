"""Command line: `listener run | demo | migrate | replay | plan | rules`."""
from __future__ import annotations

import asyncio
import sys
from typing import Optional

import typer

from listener.instants import BadInstant, parse_instant
from listener.tables import format_table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The Auto Doctor session listener: every session deadline, once, on time.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"listener: {message}", err=True)
    raise typer.Exit(code)


RULES_OPTION = typer.Option(None, "--rules", help="a rules file (TOML) to add to the packs; "
                            "may be given several times, after RULES_FILE")


def load_table(files: Optional[list[str]] = None):
    from listener.rules import RuleConfigError, load_rules

    try:
        return load_rules(files=files or ())
    except RuleConfigError as exc:
        fail(str(exc))


def load_settings():
    from pydantic import ValidationError

    from listener.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]).upper() or "configuration"
        fail(f"{where}: {first['msg']}")


@app.command()
def replay(
    file: str = typer.Argument(..., help="JSON Lines of row changes, or - for stdin"),
    until: Optional[str] = typer.Option(None, help="fire timers due up to this instant only"),
    rules: Optional[list[str]] = RULES_OPTION,
) -> None:
    """Deterministic dry run of a change log: prints each fired action as JSON."""
    from listener.logs import configure_logging
    from listener.replay import run_replay

    settings = load_settings()
    configure_logging("WARNING")  # the output is the JSON on stdout
    table = load_table(rules)
    until_at = None
    if until is not None:
        try:
            until_at = parse_instant(until)
        except BadInstant as exc:
            fail(f"--until: {exc}")
    try:
        stream = sys.stdin if file == "-" else open(file, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    with stream:
        try:
            stats = asyncio.run(run_replay(stream, table, sys.stdout, sys.stderr, until_at,
                                           settings.max_notify_lateness))
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {file}: {exc}")
    if stats.lines and not stats.applied and stats.bad:
        fail(f"no line of {file} could be read", 1)


@app.command("rules")
def rules_command(rules: Optional[list[str]] = RULES_OPTION) -> None:
    """Print the effective rules table (after rule files, RULE_* and RULES_TIME_SCALE)."""
    from listener.rules.model import Lateness

    table = load_table(rules)
    activity = _rule_activity(table)
    rows = [("#", "pack", "table", "rule", "applies while", "due at", "actions", "when late",
             "active")]
    for number, rule in enumerate(table.all_rules, 1):
        late = ("skip if > 1/4 of offset late" if rule.lateness is Lateness.SKIP_PAST_QUARTER
                else "no email if > MAX_NOTIFY_LATENESS late")
        rows.append((str(number), rule.pack, rule.table, rule.name,
                     rule.describe_when(), rule.describe_due(), rule.describe_actions(), late,
                     activity.get(rule.name, "yes" if rule.enabled else "no: disabled")))
    typer.echo(format_table(rows))
    if table.time_scale != 1:
        typer.echo(f"\nRULES_TIME_SCALE={table.time_scale:g}: offsets above are already divided.")


def _rule_activity(table) -> dict[str, str]:
    """Whether each rule is active in the configured database, and why not; empty
    when no database is configured (nothing to check against)."""
    import os

    if not (os.environ.get("DATABASE_URL") or os.environ.get("SUPABASE_URL")
            or os.environ.get("NEXT_PUBLIC_SUPABASE_URL")):
        return {}
    from listener.runtime import ConfigError, describe_activity

    settings = load_settings()
    try:
        return asyncio.run(describe_activity(settings, table))
    except ConfigError as exc:
        fail(str(exc))
    return {}


def _configured(rules: Optional[list[str]] = None):
    """Settings, logging and the rule table, or a one-line exit."""
    from listener.logs import configure_logging, register_secret

    settings = load_settings()
    try:
        configure_logging(settings.log_level)
    except ValueError as exc:
        fail(str(exc))
    for secret in (settings.supabase_service_role_key, settings.resend_api_key,
                   settings.ops_token, settings.webhook_secret):
        if secret is not None:
            register_secret(secret.get_secret_value())
    for url in (settings.database_url, settings.mqtt_url):
        if url and "@" in url and ":" in url.split("@")[0].split("//")[-1]:
            register_secret(url.split("@")[0].split("//")[-1].split(":", 1)[1])
    return settings, load_table(rules)


@app.command()
def run(rules: Optional[list[str]] = RULES_OPTION) -> None:
    """The daemon: follow row changes, fire every deadline once, on time."""
    from listener.runtime import ConfigError, serve

    settings, table = _configured(rules)
    try:
        asyncio.run(serve(settings, table))
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def migrate(
    print_sql: bool = typer.Option(False, "--print", help="write the SQL to stdout instead"),
    reference: bool = typer.Option(
        False, "--reference", help="also create the stand-in app schema (development only)"),
    rules: Optional[list[str]] = RULES_OPTION,
) -> None:
    """Apply the migrations and the rules' per-table objects to DATABASE_URL (or the
    embedded database)."""
    from listener import migrate as migrations
    from listener.rules.query import table_queries

    if print_sql:
        table = load_table(rules)
        queries = table_queries(table, load_settings().max_notify_lateness)
        sys.stdout.write(migrations.script(include_reference=reference, queries=queries))
        return
    settings, table = _configured(rules)
    queries = table_queries(table, settings.max_notify_lateness)
    if settings.backend == "supabase" and not settings.database_url:
        fail("the Supabase backend has no SQL connection: run `listener migrate --print` and "
             "paste the output into the Supabase SQL editor, or set DATABASE_URL")
    if settings.database_url:
        import psycopg

        try:
            applied = migrations.apply(settings.database_url, include_reference=reference,
                                       queries=queries)
        except psycopg.Error as exc:
            fail(f"migration failed: {str(exc).strip().splitlines()[0]}")
        target = "DATABASE_URL"
    else:
        from listener.runtime import embedded_conninfo

        applied = migrations.apply(embedded_conninfo(settings.listener_data_dir),
                                   include_reference=True, queries=queries)
        target = str(settings.listener_data_dir)
    typer.echo(f"{target}: applied {', '.join(applied) if applied else 'nothing (up to date)'}")


@app.command()
def plan(as_json: bool = typer.Option(False, "--json", help="JSON Lines instead of a table"),
         limit: int = typer.Option(50, help="show at most this many"),
         rules: Optional[list[str]] = RULES_OPTION) -> None:
    """The upcoming due actions in the configured database, soonest first."""
    import json

    from listener.instants import format_duration, format_instant
    from listener.runtime import ConfigError, upcoming_actions

    settings, table = _configured(rules)
    try:
        now, items = asyncio.run(upcoming_actions(settings, table, limit))
    except ConfigError as exc:
        fail(str(exc))
    if as_json:
        for item in items:
            line = {"due_at": format_instant(item.due), "rule": item.rule, "table": item.table,
                    "row_id": item.key, "status": item.status, "in_ms": (item.due - now) // 1000}
            if item.table == "sessions":
                line["session_id"] = item.key
            typer.echo(json.dumps(line))
        return
    rows = [("due at", "in", "rule", "table", "row", "status")]
    for item in items:
        delta = item.due - now
        when = ("overdue " + format_duration(-delta // 1_000_000 * 1_000_000)
                if delta < 0 else format_duration(delta // 1_000_000 * 1_000_000 or 1_000_000))
        rows.append((format_instant(item.due), when, item.rule, item.table, item.key,
                     item.status or ""))
    typer.echo(format_table(rows))
    if len(rows) == 1:
        typer.echo("(nothing due)")


@app.command("report")
def report_command(
    since: str = typer.Option("7d", help="window length (7d, 24h) or its start (an ISO instant)"),
    out: Optional[str] = typer.Option(None, help="write to this file instead of stdout"),
    form: str = typer.Option("html", "--format", help="html, md or json"),
    rules: Optional[list[str]] = RULES_OPTION,
) -> None:
    """The operations report from the ledger: actions, lateness, failures, claims,
    what is due next, and the audit's findings."""
    from pathlib import Path

    from listener.clock import WallClock
    from listener.instants import DAY, format_instant, parse_duration
    from listener.report import ReportError, ReportFormat, render
    from listener.report.sources import build_report, rpc_source, sql_source, supabase_client
    from listener.runtime import ConfigError, audit_findings, database_conninfo, upcoming_actions

    try:
        report_format = ReportFormat(form)
    except ValueError:
        fail(f"--format: {form!r} is not one of html, md, json")
    settings, table = _configured(rules)
    until = WallClock().now()
    try:
        start = until - parse_duration(since)
    except ValueError:
        try:
            start = parse_instant(since)
        except BadInstant:
            start = None
    if start is None or start >= until:
        fail(f"--since: {since!r} is neither a duration (7d, 24h) nor an instant in the past")

    async def gather():
        # What is due and what the audit finds need the rules' per-table objects;
        # the figures need only the ledger: a database not migrated for these
        # rules still gets its report, without those two parts.
        try:
            now, due = await upcoming_actions(settings, table)
            upcoming = [{"at": format_instant(i.due), "rule": i.rule, "table": i.table,
                         "row_id": i.key} for i in due if i.due <= now + DAY]
        except ConfigError as exc:
            typer.echo(f"listener: no upcoming actions in the report: {exc}", err=True)
            upcoming = []
        findings = await asyncio.to_thread(audit_findings, settings, table)
        if settings.backend == "supabase":
            key = settings.supabase_service_role_key.get_secret_value()
            async with supabase_client(settings.supabase_url, key) as client:
                return await build_report(rpc_source(client), start, until,
                                          upcoming=upcoming, findings=findings)
        conninfo = await asyncio.to_thread(database_conninfo, settings, {})
        return await build_report(sql_source(conninfo), start, until, upcoming=upcoming,
                                  findings=findings)

    try:
        text = render(asyncio.run(gather()), report_format)
    except ConfigError as exc:
        fail(str(exc))
    except ReportError as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a database or network error: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"report failed: {first}")
    if out is None:
        sys.stdout.write(text)
        return
    try:
        Path(out).write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror}")
    typer.echo(f"{out}: {report_format.value} report from {format_instant(start)} to "
               f"{format_instant(until)}", err=True)


@app.command()
def demo(timeout: float = typer.Option(240, help="give up after this many seconds")) -> None:
    """The daemon on the embedded database with simulated sessions, until every rule fired."""
    import os

    from listener.demo import DEMO_SCALE, run_demo
    from listener.logs import configure_logging

    os.environ.setdefault("RULES_TIME_SCALE", str(DEMO_SCALE))
    settings = load_settings()
    if settings.backend != "embedded":
        typer.echo("listener demo always uses the embedded database; DATABASE_URL and the "
                   "Supabase variables are ignored here.", err=True)
    configure_logging(os.environ.get("LOG_LEVEL", "WARNING"))
    table = load_table()
    ok = asyncio.run(run_demo(settings, table, typer.echo, timeout))
    raise typer.Exit(0 if ok else 1)


@app.command()
def audit(
    as_json: bool = typer.Option(False, "--json", help="one JSON object instead of a table"),
    app_repo: Optional[str] = typer.Option(
        None, "--app-repo", help="the app's repository: also check its vercel.json and "
                                 "render.yaml crons"),
    rules: Optional[list[str]] = RULES_OPTION,
) -> None:
    """Which time-based jobs are missing on the configured database, and which would
    run twice. Exit 0: nothing to do; 1: some finding asks for action; 2: could not run."""
    import json
    import os
    from datetime import timedelta
    from pathlib import Path

    from listener.adapters.audit_source import AuditUnavailable
    from listener.audit import Auditor, format_report
    from listener.instants import parse_duration

    settings = load_settings()
    ruleset = load_table(rules)
    try:
        timeout = parse_duration(os.environ.get("AUDIT_STATEMENT_TIMEOUT", "30s"))
    except ValueError as exc:
        fail(f"AUDIT_STATEMENT_TIMEOUT: {exc}")
    repo = None
    if app_repo is not None:
        repo = Path(app_repo)
        if not repo.is_dir():
            fail(f"--app-repo: {app_repo} is not a directory")
    from listener.runtime import audit_source

    try:
        source = audit_source(settings, timeout)
    except AuditUnavailable as exc:
        fail(str(exc))
    try:
        # Due more than a reconcile interval and a minute ago: a running
        # listener would have acted by then.
        grace = timedelta(microseconds=settings.reconcile_interval + 60_000_000)
        report = Auditor(source, ruleset, grace=grace,
                         max_notify_lateness=settings.max_notify_lateness).run(repo)
    except AuditUnavailable as exc:
        fail(str(exc))
    finally:
        source.close()
    if as_json:
        typer.echo(json.dumps(report.as_json(), default=str, indent=2))
    else:
        typer.echo(format_report(report))
    raise typer.Exit(report.exit_code)


def main() -> None:
    app()
