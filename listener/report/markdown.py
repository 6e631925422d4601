"""The report as Markdown: the same sections as the HTML page, tables only.

Values from the database are made inert: HTML special characters become
entities (a Markdown viewer renders raw HTML), pipes are escaped and line
breaks flattened so a reason never breaks its table row.
"""
from __future__ import annotations

from html import escape
from typing import Any, Iterable, Sequence

from listener.report.figures import OUTCOMES, PERCENTILES
from listener.report.html import format_ms, format_when


def cell(value: Any) -> str:
    if value is None:
        return ""
    text = escape(str(value), quote=False)
    return " ".join(text.split()).replace("|", "\\|").replace("`", "\\`")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    outcomes = [o.value for o in OUTCOMES]
    health = report["health"]
    out = ["# Listener operations report", "",
           f"From {format_when(report['since'])} to {format_when(report['until'])} (UTC).", "",
           "## Summary", ""]
    out += table(outcomes + ["unfinished claims", "due in 24 h", "findings to act on"],
                 [[report["totals"][o] for o in outcomes]
                  + [len(report["unfinished"]), len(report["upcoming"]),
                     sum(1 for f in report["findings"] if f.get("severity") == "action")]])
    out += ["", "## Listener health", "",
            f"- lease holder: {cell(health.get('lease_holder')) or 'nobody (no active instance)'}",
            f"- lease renewed: {format_when(health.get('lease_renewed_at'))}",
            f"- last reconcile: {format_when(health.get('last_reconcile_at'))}", ""]
    out += ["## Actions by rule", ""]
    if report["rules"]:
        out += table(["rule", "table"] + outcomes + ["total"],
                     [[r["rule"], r["table"]] + [r["outcomes"][o] for o in outcomes]
                      + [r["total"]] for r in report["rules"]])
    else:
        out.append("No action finished in this window.")
    out += ["", "## Lateness", ""]
    if report["rules"]:
        out += table(["rule", "table"] + list(PERCENTILES),
                     [[r["rule"], r["table"]]
                      + [format_ms(r["lateness_ms"][p]) for p in PERCENTILES]
                      for r in report["rules"]])
    else:
        out.append("No lateness measured in this window.")
    out += ["", f"## Failures ({report['failures_total']})", ""]
    if report["failures"]:
        out += table(["fired at", "rule", "table", "row", "attempts", "reason"],
                     [[format_when(f.get("fired_at")), f.get("rule"), f.get("table"),
                       f.get("row_id"), f.get("attempts"), f.get("reason")]
                      for f in report["failures"]])
    else:
        out.append("No failure in this window.")
    out += ["", "## Unfinished claims", ""]
    if report["unfinished"]:
        out += table(["claimed at", "rule", "table", "row", "due at", "holder", "attempts"],
                     [[format_when(u.get("claimed_at")), u.get("rule"), u.get("table"),
                       u.get("row_id"), format_when(u.get("due_at")), u.get("holder"),
                       u.get("attempts")] for u in report["unfinished"]])
    else:
        out.append("None: every claimed action finished.")
    out += ["", "## Due in the next 24 hours", ""]
    if report["upcoming"]:
        out += table(["due at", "rule", "table", "row"],
                     [[format_when(u["at"]), u["rule"], u["table"], u["row_id"]]
                      for u in report["upcoming"]])
    else:
        out.append("Nothing due.")
    out += ["", "## Audit findings", ""]
    if report["findings"]:
        out += table(["severity", "kind", "what", "rule", "table", "count"],
                     [[f["severity"], f["kind"], f["message"], f.get("rule"), f.get("table"),
                       f.get("count")] for f in report["findings"]])
    else:
        out.append("No finding given.")
    return "\n".join(out) + "\n"
