"""Command line: `listener run | demo | migrate | replay | plan | rules`."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

import typer

from listener.instants import BadInstant, format_duration, parse_instant

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The Auto Doctor session listener: every session deadline, once, on time.")


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"listener: {message}", err=True)
    raise typer.Exit(code)


def load_table():
    from rules import RuleConfigError, load_rules

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
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            typer.echo("  ".join("-" * w for w in widths))
    if table.time_scale != 1:
        typer.echo(f"\nRULES_TIME_SCALE={table.time_scale:g}: offsets above are already divided.")


def main() -> None:
    app()
