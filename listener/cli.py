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


def load_table():
    from listener.rules import RuleConfigError, load_rules

    try:
        return load_rules()
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
) -> None:
    """Deterministic dry run of a change log: prints each fired action as JSON."""
    from listener.logs import configure_logging
    from listener.replay import run_replay

    settings = load_settings()
    configure_logging("WARNING")  # the output is the JSON on stdout
    table = load_table()
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
def rules_command() -> None:
    """Print the effective rules table (after RULE_* and RULES_TIME_SCALE)."""
    table = load_table()
    rows = [("#", "rule", "applies while", "due at", "actions", "when late")]
    for number, rule in enumerate(table.all_rules, 1):
        late = ("skip if > 1/4 of offset late" if rule.lateness == "skip_past_quarter"
                else "no email if > MAX_NOTIFY_LATENESS late")
        rows.append((str(number), rule.name + ("" if rule.enabled else " (off)"),
                     rule.when.describe(), rule.describe_due() if rule.enabled else "off",
                     rule.describe_actions(), late))
    typer.echo(format_table(rows))
    if table.time_scale != 1:
        typer.echo(f"\nRULES_TIME_SCALE={table.time_scale:g}: offsets above are already divided.")


def _configured():
    """Settings, logging and the rule table, or a one-line exit."""
    from listener.logs import configure_logging, register_secret

    settings = load_settings()
    try:
        configure_logging(settings.log_level)
    except ValueError as exc:
        fail(str(exc))
    for secret in (settings.supabase_service_role_key, settings.resend_api_key):
        if secret is not None:
            register_secret(secret.get_secret_value())
    for url in (settings.database_url, settings.mqtt_url):
        if url and "@" in url and ":" in url.split("@")[0].split("//")[-1]:
            register_secret(url.split("@")[0].split("//")[-1].split(":", 1)[1])
    return settings, load_table()


@app.command()
def run() -> None:
    """The daemon: follow session changes, fire every deadline once, on time."""
    from listener.runtime import ConfigError, serve

    settings, table = _configured()
    try:
        asyncio.run(serve(settings, table))
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def migrate(
    print_sql: bool = typer.Option(False, "--print", help="write the SQL to stdout instead"),
    reference: bool = typer.Option(
        False, "--reference", help="also create the stand-in app schema (development only)"),
) -> None:
    """Apply migrations/ to DATABASE_URL (or the embedded database)."""
    from listener import migrate as migrations

    if print_sql:
        sys.stdout.write(migrations.script(include_reference=reference))
        return
    settings, _ = _configured()
    if settings.backend == "supabase" and not settings.database_url:
        fail("the Supabase backend has no SQL connection: run `listener migrate --print` and "
             "paste the output into the Supabase SQL editor, or set DATABASE_URL")
    if settings.database_url:
        import psycopg

        try:
            applied = migrations.apply(settings.database_url, include_reference=reference)
        except psycopg.Error as exc:
            fail(f"migration failed: {str(exc).strip().splitlines()[0]}")
        target = "DATABASE_URL"
    else:
        from listener.runtime import embedded_conninfo

        embedded_conninfo(settings.listener_data_dir)
        applied, target = ["(embedded database up to date)"], str(settings.listener_data_dir)
    typer.echo(f"{target}: applied {', '.join(applied) if applied else 'nothing (up to date)'}")


@app.command()
def plan(as_json: bool = typer.Option(False, "--json", help="JSON Lines instead of a table"),
         limit: int = typer.Option(50, help="show at most this many")) -> None:
    """The upcoming due actions in the configured database, soonest first."""
    import json

    from listener.clock import WallClock
    from listener.engine import Engine
    from listener.instants import format_duration, format_instant
    from listener.runtime import ConfigError, open_backend
    from listener.store import all_tracked

    settings, table = _configured()

    async def upcoming():
        now = WallClock().now()
        backend = await open_backend(settings, table, now)
        try:
            rows = await all_tracked(backend.store)
        finally:
            await backend.close()
        engine = Engine(table, settings.max_notify_lateness)
        for row in rows:
            try:
                engine.upsert(row, now)
            except ValueError:
                continue
        return now, list(engine.upcoming())[:limit], {r["id"]: r.get("status") for r in rows}

    try:
        now, items, statuses = asyncio.run(upcoming())
    except ConfigError as exc:
        fail(str(exc))
    if as_json:
        for due, rule, sid in items:
            typer.echo(json.dumps({"due_at": format_instant(due), "rule": rule.name,
                                   "session_id": sid, "status": statuses.get(sid),
                                   "in_ms": (due - now) // 1000}))
        return
    rows = [("due at", "in", "rule", "session", "status")]
    for due, rule, sid in items:
        delta = due - now
        when = ("overdue " + format_duration(-delta // 1_000_000 * 1_000_000)
                if delta < 0 else format_duration(delta // 1_000_000 * 1_000_000 or 1_000_000))
        rows.append((format_instant(due), when, rule.name, sid, statuses.get(sid) or ""))
    typer.echo(format_table(rows))
    if len(rows) == 1:
        typer.echo("(nothing due)")


@app.command("report")
def report_command(
    since: str = typer.Option("7d", help="window length (7d, 24h) or its start (an ISO instant)"),
    out: Optional[str] = typer.Option(None, help="write to this file instead of stdout"),
    form: str = typer.Option("html", "--format", help="html, md or json"),
) -> None:
    """The operations report from the ledger: actions, lateness, failures, claims."""
    from pathlib import Path

    from listener.clock import WallClock
    from listener.instants import format_instant, parse_duration
    from listener.report import ReportError, ReportFormat, render
    from listener.report.sources import build_report, rpc_source, sql_source, supabase_client
    from listener.runtime import ConfigError, database_conninfo

    try:
        report_format = ReportFormat(form)
    except ValueError:
        fail(f"--format: {form!r} is not one of html, md, json")
    settings, _ = _configured()
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
        # TODO(lead): upcoming = the actions due in the next 24 h as {at, rule, table,
        # row_id}, from the same evaluation `plan` runs once it reads rows of any table;
        # findings = `listener audit`'s findings once that lands.
        if settings.backend == "supabase":
            key = settings.supabase_service_role_key.get_secret_value()
            async with supabase_client(settings.supabase_url, key) as client:
                return await build_report(rpc_source(client), start, until)
        conninfo = await asyncio.to_thread(database_conninfo, settings)
        return await build_report(sql_source(conninfo), start, until)

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


def main() -> None:
    app()
