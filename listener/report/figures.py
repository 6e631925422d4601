"""The report's figures: computed by PostgreSQL, completed by the caller.

One SQL function, ``listener_report_v1(p_since, p_until)``, returns every
figure taken from the ledger as one JSON object, over a SQL connection or over
PostgREST RPC alike. What the ledger cannot know comes from the caller: the
actions due next (``upcoming``, from the daemon's rule evaluation) and the
audit's findings. :func:`assemble` checks and joins the three into the report
every format renders.
"""
from __future__ import annotations

import enum
from typing import Any, Iterable, Mapping

from listener.adapters.calls import REPORT
from listener.instants import Instant, format_instant
from listener.rules.model import Outcome

# In the order every format shows them.
OUTCOMES: tuple[Outcome, ...] = (Outcome.FIRED, Outcome.SKIPPED, Outcome.LATE, Outcome.FAILED)
PERCENTILES = ("p50", "p95", "p99", "max")

UPCOMING_FIELDS = ("at", "rule", "table", "row_id")
HEALTH_FIELDS = ("lease_holder", "lease_expires_at", "lease_renewed_at", "fencing_token",
                 "last_reconcile_at", "last_drift")
FINDING_FIELDS = ("kind", "severity", "message", "rule", "table", "column", "count", "job")


class Step(str, enum.Enum):
    """The width of one bar of the actions-over-time chart."""

    HOUR = "hour"
    DAY = "day"


class ReportError(Exception):
    """The figures could not be gathered or did not have the expected shape."""


def report_args(since: Instant, until: Instant) -> dict[str, Instant]:
    if until <= since:
        raise ReportError(f"the window is empty: {format_instant(since)} to "
                          f"{format_instant(until)}")
    return {"p_since": since, "p_until": until}


async def figures_over_sql(conninfo: str, since: Instant, until: Instant) -> dict[str, Any]:
    """The ledger's figures over a SQL connection (DATABASE_URL or the embedded database)."""
    import psycopg

    args = report_args(since, until)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        cursor = await conn.execute(REPORT.sql(), REPORT.sql_args(args))
        row = await cursor.fetchone()
    return _checked(row[0] if row else None)


async def figures_over_rpc(client: Any, since: Instant, until: Instant) -> dict[str, Any]:
    """The same figures through supabase-py's async client (``client.rpc``)."""
    response = await client.rpc(REPORT.function,
                                REPORT.json_args(report_args(since, until))).execute()
    return _checked(response.data)


def _checked(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("rules"), list):
        raise ReportError(f"{REPORT.function} answered {str(raw)[:200]!r}: is the migration "
                          "0008_report.sql applied?")
    return raw


def _number(value: Any) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _upcoming_item(item: Mapping[str, Any]) -> dict[str, Any]:
    missing = [name for name in UPCOMING_FIELDS if name not in item]
    if missing:
        raise ReportError(f"an upcoming action lacks {', '.join(missing)}: {dict(item)!r:.200}")
    at = item["at"]
    return {"at": format_instant(at) if isinstance(at, int) else str(at),
            "rule": str(item["rule"]), "table": str(item["table"]),
            "row_id": str(item["row_id"])}


def _finding(item: Mapping[str, Any]) -> dict[str, Any]:
    for name in ("kind", "severity", "message"):
        if name not in item:
            raise ReportError(f"an audit finding lacks {name}: {dict(item)!r:.200}")
    return {name: item.get(name) for name in FINDING_FIELDS}


def assemble(raw: Mapping[str, Any], upcoming: Iterable[Mapping[str, Any]] = (),
             findings: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The report: the ledger's figures, what is due next, and the audit's findings.

    Whole-number percentiles become integers so the JSON reads as written by
    hand; action findings come before informational ones.
    """
    rules = []
    for entry in raw["rules"]:
        outcomes = entry.get("outcomes") or {}
        lateness = entry.get("lateness_ms") or {}
        rules.append({
            "rule": entry["rule"], "table": entry["table"],
            "outcomes": {o.value: int(outcomes.get(o.value) or 0) for o in OUTCOMES},
            "total": int(entry.get("total") or 0),
            "lateness_ms": {p: _number(lateness.get(p)) for p in PERCENTILES},
            "histogram": [int(n) for n in entry.get("histogram") or []],
        })
    histogram = raw.get("histogram") or {}
    ordered_findings = sorted((_finding(f) for f in findings or ()),
                              key=lambda f: 0 if f["severity"] == "action" else 1)
    return {
        "since": raw["since"],
        "until": raw["until"],
        "generated_at": raw.get("generated_at"),
        "step": Step(raw.get("step") or Step.HOUR).value,
        "rules": rules,
        "totals": {o.value: sum(r["outcomes"][o.value] for r in rules) for o in OUTCOMES},
        "histogram": {"edges_ms": list(histogram.get("edges_ms") or []),
                      "counts": [int(n) for n in histogram.get("counts") or []]},
        "timeline": list(raw.get("timeline") or []),
        "failures": list(raw.get("failures") or []),
        "failures_total": int(raw.get("failures_total") or 0),
        "unfinished": list(raw.get("unfinished") or []),
        "health": {name: (raw.get("health") or {}).get(name) for name in HEALTH_FIELDS},
        "upcoming": sorted((_upcoming_item(u) for u in upcoming), key=lambda u: u["at"]),
        "findings": ordered_findings,
    }


def window(until: Instant, length: int) -> tuple[Instant, Instant]:
    """[until - length, until), checked."""
    if length <= 0:
        raise ReportError("the window must be longer than zero")
    return until - length, until


__all__ = ["FINDING_FIELDS", "HEALTH_FIELDS", "OUTCOMES", "PERCENTILES", "ReportError", "Step",
           "UPCOMING_FIELDS", "assemble", "figures_over_rpc", "figures_over_sql",
           "REPORT", "report_args", "window"]
