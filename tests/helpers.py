"""Builders for session rows and replay runs on virtual time."""
from __future__ import annotations

import asyncio
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from listener.replay import run_replay
from listener.rules import load_rules

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
MECH = "11111111-1111-4111-8111-111111111111"
CUST = "22222222-2222-4222-8222-222222222222"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def at(minutes: float = 0, **kw: float) -> datetime:
    return T0 + timedelta(minutes=minutes, **kw)


def row(sid: str = "s1", status: str = "pending", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": sid, "status": status, "type": "video", "customer_user_id": CUST,
        "mechanic_id": None, "created_at": iso(T0), "updated_at": iso(T0), "started_at": None,
        "ended_at": None, "scheduled_for": None, "expires_at": None,
        "summary_submitted_at": None, "metadata": {},
    }
    for key, value in fields.items():
        base[key] = iso(value) if isinstance(value, datetime) else value
    return base


def event(when: datetime, kind: str, record: dict[str, Any],
          table: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"at": iso(when), "type": kind}
    if table is not None:
        out["table"] = table
    if kind == "DELETE":
        out["old_record"] = {"id": record["id"]}
    else:
        out["record"] = record
    return out


def extension(xid: str, sid: str | None, minutes: Any) -> dict[str, Any]:
    """A paid extension: a session_extensions row."""
    return {"id": xid, "session_id": sid, "minutes": minutes, "payment_intent_id": f"pi_{xid}"}


def extension_event(when: datetime, kind: str, record: dict[str, Any]) -> dict[str, Any]:
    return event(when, kind, record, table="session_extensions")


def replay(events: list[dict[str, Any] | str], env: dict[str, str] | None = None,
           until: datetime | None = None, max_late_us: int = 3600 * 10**6,
           files: Iterable[str | Path] = ()) -> tuple[list[dict[str, Any]], str]:
    """Run replay in process; returns (output lines as dicts, stderr text)."""
    lines = [e if isinstance(e, str) else json.dumps(e) for e in events]
    out, err = io.StringIO(), io.StringIO()
    until_us = None
    if until is not None:
        until_us = int((until - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()) * 10**6
    asyncio.run(run_replay(lines, load_rules(env or {}, files), out, err, until_us,
                           max_late_us))
    return [json.loads(x) for x in out.getvalue().splitlines()], err.getvalue()


def fired(lines: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(HH:MM[:SS] offset from T0 as minutes, rule) pairs, compact for assertions."""
    out = []
    for line in lines:
        when = datetime.fromisoformat(line["at"].replace("Z", "+00:00"))
        minutes = (when - T0).total_seconds() / 60
        out.append((minutes, line["rule"]))
    return out
