"""`listener audit`: which time-based jobs are missing on a live database, and
which would run twice.

It asks the database (read only) per rule how many rows owe it an action and
how many are overdue with nothing in the ledger; which deadline-like columns
no rule reads and how many rows are already past them; which pg_cron jobs
exist; how healthy the ledger is; which statuses and plan values no rule
knows. With the app's repository it also reads its Vercel and Render crons.
Every answer becomes a finding: what is wrong, where, and what to do.
"""
from __future__ import annotations

import enum
import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Mapping

from listener.adapters.audit_source import AuditSource, AuditTimeout
from listener.adapters.calls import (AUDIT_CRON, AUDIT_DEADLINE_COLUMNS, AUDIT_LEDGER, AUDIT_OVERDUE,
                                     AUDIT_VALUES, Call)
from listener.rules.model import RuleSet
from listener.rules.query import table_queries
from listener.tables import format_table


class Severity(str, enum.Enum):
    ACTION = "action"  # something to do before (or after) deploying
    INFO = "info"


class Kind(str, enum.Enum):
    OVERDUE = "overdue"
    UNCOVERED_DEADLINE = "uncovered_deadline"
    DUPLICATE_CRON = "duplicate_cron"
    STUCK_CLAIM = "stuck_claim"
    FAILED_ACTIONS = "failed_actions"
    INACTIVE_RULE = "inactive_rule"
    UNKNOWN_STATUS = "unknown_status"
    UNKNOWN_PLAN = "unknown_plan"
    CRON_UNREADABLE = "cron_unreadable"
    TIMEOUT = "timeout"


@dataclass
class Finding:
    kind: Kind
    severity: Severity
    message: str
    advice: str
    rule: str | None = None
    table: str | None = None
    column: str | None = None
    count: int | None = None
    job: str | None = None
    keys: list[str] = field(default_factory=list)  # a few rows to look at

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None and v != []}
        out["kind"], out["severity"] = self.kind.value, self.severity.value
        return out


# What each rule takes over from the app's clocks: the cron endpoints (paths)
# and SQL functions (pg_cron twins) that did its work. A clock calling one of
# these while the rule is active does the work twice. Keyed by rule name.
REPLACES: dict[str, tuple[str, ...]] = {
    "mechanic_nudge": ("/api/cron/monitor-sessions",),
    "support_stuck_alert": ("/api/cron/monitor-sessions",),
    "auto_end_max_duration": ("/api/cron/monitor-sessions", "cleanup_stuck_live_sessions()",
                              "run_scheduled_cleanup()"),
    "plan_time_expiry": ("/api/cron/expire-sessions", "auto_expire_sessions()"),
    "request_expiry": ("expire_orphaned_sessions()", "/api/cron/expire-requests"),
    "waiting_timeout": ("expire_orphaned_sessions()", "cleanup_mechanic_no_shows()",
                        "run_scheduled_cleanup()"),
    "scheduled_reminder_24h": ("/api/reminders/send",),
    "scheduled_reminder_1h": ("/api/reminders/send",),
    "scheduled_reminder_15m": ("/api/reminders/send", "/api/cron/check-scheduled-sessions"),
    "scheduled_no_show": ("/api/cron/check-scheduled-sessions", "handle_no_shows()"),
    "reservation_expiry": ("/api/cron/release-expired-reservations",),
    "waitlist_expiry": ("expire_old_waitlist_entries()", "run_scheduled_cleanup()"),
    "rfq_expiry": ("/api/cron/rfq-expiration", "auto_expire_rfq_marketplace()"),
    "rfq_deadline_warning": ("/api/cron/rfq-expiration",),
    "session_invite_expiry": ("expire_old_invite_codes()", "run_scheduled_cleanup()"),
    "workshop_invite_expired": ("/api/cron/workshop-alerts",),
    "workshop_application_stuck": ("/api/cron/workshop-alerts",),
    "subscription_credits_due": ("/api/cron/allocate-credits",),
}

# Work some of those clocks do that no rule does: deleting the job would lose it.
OTHER_WORK: dict[str, str] = {
    "/api/cron/workshop-alerts": "the churned-workshop alert",
    "run_scheduled_cleanup()": "the legacy session_requests and customer no-show cleanup",
}


@dataclass(frozen=True)
class Clock:
    """One scheduled job of the app: a pg_cron job, a Vercel cron, a Render cron."""

    job: str  # "pg_cron 3 monitor-sessions", "vercel /api/cron/...", "render session-monitor-cron"
    schedule: str
    text: str  # what it runs: the command, the path, the start command and its scripts
    name: str = ""  # the job's own name, matched when its URL comes from Vault
    active: bool = True
    where: str = ""  # how to turn it off


def _slug(target: str) -> str:
    if target.endswith("()"):
        return target[:-2].replace("_", "-")
    return target.rstrip("/").rsplit("/", 1)[-1]


def targets_called(clock: Clock, targets: Iterable[str]) -> list[str]:
    """The endpoints and functions of `targets` that a clock calls."""
    text = clock.text.lower()
    by_name = "vault" in text or "decrypted_secret" in text
    name = re.sub(r"[^a-z0-9]+", "-", clock.name.lower())
    found = []
    for target in targets:
        if target.endswith("()"):
            hit = re.search(r"(^|[^a-z0-9_])" + re.escape(target[:-2]) + r"\s*\(", text)
        else:
            hit = re.search(re.escape(target.lower()) + r"(?![a-z0-9-])", text)
        if hit is None and by_name and _slug(target) in name:
            hit = True  # the URL is a Vault secret: the job's name says what it calls
        if hit:
            found.append(target)
    return found


def pg_cron_clocks(answer: Mapping[str, Any]) -> list[Clock]:
    return [Clock(job=f"pg_cron {j['jobid']} {j.get('jobname') or ''}".strip(),
                  schedule=j.get("schedule") or "", text=j.get("command") or "",
                  name=j.get("jobname") or "", active=bool(j.get("active", True)),
                  where=f"select cron.unschedule({j['jobid']});")
            for j in answer.get("jobs") or []]


def _script_text(repo: Path, command: str) -> str:
    """The command and any file of the repository it runs (`node scripts/run-cron.js`):
    the endpoints are often in the script, not in the command."""
    parts = [command]
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for word in words:
        path = (repo / word).resolve()
        if repo.resolve() in path.parents and path.is_file() and path.stat().st_size < 1_000_000:
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def app_repo_clocks(repo: Path) -> tuple[list[Clock], list[str]]:
    """The crons of the app's `vercel.json` and `render.yaml`, and problems reading them."""
    import yaml

    clocks: list[Clock] = []
    problems: list[str] = []
    vercel = repo / "vercel.json"
    if vercel.is_file():
        try:
            crons = json.loads(vercel.read_text(encoding="utf-8")).get("crons") or []
            for cron in crons:
                clocks.append(Clock(job=f"vercel {cron.get('path')}",
                                    schedule=str(cron.get("schedule", "")),
                                    text=str(cron.get("path", "")),
                                    where=f"remove it from {vercel.name} (crons) and redeploy"))
        except (ValueError, AttributeError) as exc:
            problems.append(f"{vercel}: not readable as Vercel config ({exc})")
    render = repo / "render.yaml"
    if render.is_file():
        try:
            blueprint = yaml.safe_load(render.read_text(encoding="utf-8")) or {}
            for service in blueprint.get("services") or []:
                if not isinstance(service, dict) or service.get("type") != "cron":
                    continue
                command = " ".join(str(service.get(k) or "")
                                   for k in ("startCommand", "dockerCommand")).strip()
                clocks.append(Clock(job=f"render {service.get('name')}",
                                    schedule=str(service.get("schedule", "")),
                                    text=_script_text(repo, command), name=str(service.get("name")),
                                    where=f"delete the cron service from {render.name} "
                                          "and in the Render dashboard"))
        except (yaml.YAMLError, AttributeError) as exc:
            problems.append(f"{render}: not readable as a Render blueprint ({exc})")
    return clocks, problems


@dataclass
class RuleStatus:
    rule: str
    table: str
    enabled: bool
    active: bool
    missing: list[str] = field(default_factory=list)
    owing: int | None = None
    overdue: int | None = None


@dataclass
class AuditReport:
    findings: list[Finding]
    rules: list[RuleStatus]
    ledger: dict[str, Any]
    cron: dict[str, Any]

    @property
    def actions(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ACTION]

    @property
    def exit_code(self) -> int:
        return 1 if self.actions else 0

    def as_json(self) -> dict[str, Any]:
        ordered = sorted(self.findings, key=lambda f: f.severity is not Severity.ACTION)
        return {"findings": [f.as_json() for f in ordered],
                "rules": [asdict(r) for r in self.rules],
                "ledger": self.ledger, "cron": self.cron}


def _when(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _keys_text(keys: list[str]) -> str:
    return ", ".join(keys)


class Auditor:
    def __init__(self, source: AuditSource, ruleset: RuleSet, *, grace: timedelta,
                 max_notify_lateness: int, sample: int = 5) -> None:
        self.source = source
        self.ruleset = ruleset
        self.grace = grace
        self.sample = sample
        self.queries = table_queries(ruleset, max_notify_lateness)
        self.findings: list[Finding] = []
        self.timed_out: set[tuple[str, str]] = set()

    def _call(self, what: str, table: str | None, call: Call, args: Mapping[str, Any]) -> Any:
        """One call; a statement timeout becomes an info finding naming the table."""
        try:
            return self.source.call(call, args)
        except AuditTimeout:
            if (what, table or "") not in self.timed_out:
                self.timed_out.add((what, table or ""))
                where = f"table {table}" if table else "the database"
                self.findings.append(Finding(
                    Kind.TIMEOUT, Severity.INFO,
                    f"{what} on {where} ran past the statement timeout: its figures are missing",
                    "run the audit again when the database is quieter, or give it more time "
                    "with AUDIT_STATEMENT_TIMEOUT; an index on the columns named helps",
                    table=table))
            return None

    # -- the checks ----------------------------------------------------------------------

    def rules_and_overdue(self) -> list[RuleStatus]:
        statuses: list[RuleStatus] = []
        answers: dict[str, dict[str, Any]] = {}
        for name, query in self.queries.items():
            if not query.conditions:
                continue
            rows = self._call("counting overdue rows", name, AUDIT_OVERDUE,
                              {"p_query": query.as_json(), "p_grace": self.grace,
                               "p_sample": self.sample})
            for row in rows or []:
                answers[row["rule"]] = row
        for rule in self.ruleset.all_rules:
            if not rule.enabled:
                statuses.append(RuleStatus(rule.name, rule.table, False, False))
                self.findings.append(Finding(
                    Kind.INACTIVE_RULE, Severity.INFO,
                    f"rule {rule.name} is off (shipped off in its pack, or switched off)",
                    f"nothing does its work unless the app still does: switch it on "
                    f"({rule.env_name}=on, or enabled = true in RULES_FILE) if its job is wanted",
                    rule=rule.name, table=rule.table))
                continue
            row = answers.get(rule.name)
            if row is None:  # its table timed out
                statuses.append(RuleStatus(rule.name, rule.table, True, True))
                continue
            missing = list(row.get("missing") or [])
            status = RuleStatus(rule.name, rule.table, True, not missing, missing,
                                row.get("owing"), row.get("overdue"))
            statuses.append(status)
            if missing:
                self.findings.append(Finding(
                    Kind.INACTIVE_RULE, Severity.INFO,
                    f"rule {rule.name} is inactive here: {rule.table} lacks "
                    f"{', '.join(missing)}",
                    "nothing does its work on this database; if the app has this table "
                    "elsewhere, fix the rule's table or columns (RULES_FILE)",
                    rule=rule.name, table=rule.table))
            elif status.overdue:
                keys = list(row.get("sample_keys") or [])
                self.findings.append(Finding(
                    Kind.OVERDUE, Severity.ACTION,
                    f"{status.overdue} row(s) of {rule.table} are overdue for {rule.name} "
                    f"(the oldest due {_when(row.get('oldest_overdue'))}) and nothing acted",
                    f"look at these rows first ({_keys_text(keys)}): the listener acts on "
                    "every one of them as soon as it runs (status changes and webhooks; "
                    "emails only within MAX_NOTIFY_LATENESS); if it is running, check its "
                    "logs and `listener report`",
                    rule=rule.name, table=rule.table, count=status.overdue, keys=keys))
        return statuses

    def uncovered_deadlines(self) -> None:
        read: dict[str, list[str]] = {}
        for name, query in self.queries.items():
            read.setdefault(name, []).extend(query.columns)
        for name, table in self.ruleset.tables.items():
            if name in read:
                read[name] += [table.key, table.status]
        candidates = self._call("listing deadline columns", None,
                                AUDIT_DEADLINE_COLUMNS,
                                {"p_read": read, "p_count": False})
        for table in dict.fromkeys(c["table_name"] for c in candidates or []):
            rows = self._call("counting rows past deadline columns", table,
                              AUDIT_DEADLINE_COLUMNS,
                              {"p_read": read, "p_table": table, "p_count": True})
            for row in rows or []:
                column, past = row["column_name"], row.get("past") or 0
                where = f"{table}.{column}"
                if past:
                    many = f"at least {past}" if row.get("past_capped") else str(past)
                    self.findings.append(Finding(
                        Kind.UNCOVERED_DEADLINE, Severity.ACTION,
                        f"{many} row(s) of {table} are past {column}, a deadline no rule reads",
                        f"decide what should happen at {where}: add a rule for it (a pack "
                        f"or RULES_FILE) or keep the app's job for it; look at the rows "
                        f"where {column} < now()",
                        table=table, column=column, count=past))
                else:
                    self.findings.append(Finding(
                        Kind.UNCOVERED_DEADLINE, Severity.INFO,
                        f"{where} looks like a deadline no rule reads (no row is past it yet)",
                        f"if something should happen at {where}, add a rule for it",
                        table=table, column=column, count=0))

    def _active_rules(self, statuses: list[RuleStatus]) -> set[str]:
        return {s.rule for s in statuses if s.active}

    def duplicate_clocks(self, clocks: list[Clock], statuses: list[RuleStatus]) -> None:
        active = self._active_rules(statuses)
        configured = {s.rule for s in statuses}
        by_target: dict[str, list[str]] = {}
        for rule, targets in REPLACES.items():
            for target in targets:
                by_target.setdefault(target, []).append(rule)
        for clock in clocks:
            if not clock.active:
                continue
            for target in targets_called(clock, by_target):
                doubled = [r for r in by_target[target] if r in active]
                if not doubled:
                    continue
                left = [r for r in by_target[target] if r not in active and r in configured]
                keep = []
                if left:
                    keep.append("rules " + ", ".join(left) + " are not active")
                if target in OTHER_WORK:
                    keep.append(f"it also does {OTHER_WORK[target]}, which no rule does")
                advice = (f"disable this job ({clock.where})" if not keep else
                          f"it is only partly replaced ({'; '.join(keep)}): stop it doing "
                          f"the work of {', '.join(doubled)} in the app, or enable the rest "
                          f"and then disable it ({clock.where})")
                self.findings.append(Finding(
                    Kind.DUPLICATE_CRON, Severity.ACTION,
                    f"{clock.job} ({clock.schedule}) calls {target}, whose work "
                    f"{', '.join(doubled)} now do{'es' if len(doubled) == 1 else ''}: "
                    "it would act twice",
                    advice, rule=", ".join(doubled), job=clock.job))

    def cron(self) -> tuple[dict[str, Any], list[Clock]]:
        answer = self._call("reading pg_cron jobs", None, AUDIT_CRON, {}) or {}
        if answer.get("installed") and not answer.get("readable"):
            self.findings.append(Finding(
                Kind.CRON_UNREADABLE, Severity.INFO,
                f"pg_cron is installed but its jobs are not readable here "
                f"({answer.get('error') or 'no permission'})",
                "run `select jobid, jobname, schedule, command from cron.job` in the "
                "Supabase SQL editor and disable any job that calls an endpoint or "
                "function a rule replaces"))
        return answer, pg_cron_clocks(answer)

    def ledger(self) -> dict[str, Any]:
        answer = self._call("reading the ledger", "listener_ledger", AUDIT_LEDGER, {}) or {}
        stuck = answer.get("stuck_count") or 0
        if stuck:
            claims = answer.get("stuck") or []
            keys = [f"{c.get('rule')}/{c.get('table_name')}/{c.get('row_key')}" for c in claims]
            self.findings.append(Finding(
                Kind.STUCK_CLAIM, Severity.ACTION,
                f"{stuck} claim(s) unfinished for over 5 minutes (oldest claimed "
                f"{claims[0].get('claimed_at') if claims else '?'} by "
                f"{claims[0].get('holder') if claims else '?'})",
                "start the listener (it resumes unfinished claims at start); if one is "
                "running, its logs for these actions say why they stall",
                count=stuck, keys=keys))
        for failure in answer.get("failures") or []:
            why = failure.get("last_why")
            self.findings.append(Finding(
                Kind.FAILED_ACTIONS, Severity.ACTION,
                f"{failure['failed']} action(s) of {failure['rule']} failed in the last 24 h"
                + (f" (last: {why})" if why else ""),
                "see `listener report` for the reasons; fix the cause (email, webhook), "
                "then act on these rows by hand: the listener does not retry a failed action",
                rule=failure["rule"], table=failure.get("table_name"),
                count=failure["failed"], keys=list(failure.get("sample_keys") or [])))
        return answer

    def unknown_values(self) -> None:
        for name, query in self.queries.items():
            table = self.ruleset.tables.get(name)
            if table is None or not query.conditions:
                continue
            if table.known_statuses:
                rows = self._call("counting unknown statuses", name, AUDIT_VALUES,
                                  {"p_table": name, "p_column": table.status,
                                   "p_known": sorted(table.known_statuses)})
                for row in rows or []:
                    self.findings.append(Finding(
                        Kind.UNKNOWN_STATUS, Severity.INFO,
                        f"{row['rows']} row(s) of {name} have status {row['value']!r}, "
                        "which no rule knows: they are treated as terminal",
                        f"if the app writes {row['value']!r}, add it to known_statuses of "
                        f"[tables.{name}] (and to the rules that apply to it); otherwise fix "
                        "those rows",
                        table=name, column=table.status, count=row["rows"]))
            for derived_name, derived in table.derived.items():
                users = [r for r in self.ruleset.rules
                         if r.table == name and derived_name in r.anchor]
                if not users:
                    continue
                statuses = None if any(not r.statuses for r in users) else \
                    sorted({s for r in users for s in r.statuses})
                for lookup in derived.lookups:
                    known = sorted(self.ruleset.maps.get(lookup.map, {}))
                    rows = self._call("counting unknown plan values", name,
                                      AUDIT_VALUES,
                                      {"p_table": name, "p_column": lookup.column,
                                       "p_known": known, "p_status_column": table.status,
                                       "p_statuses": statuses})
                    for row in rows or []:
                        self.findings.append(Finding(
                            Kind.UNKNOWN_PLAN, Severity.INFO,
                            f"{row['rows']} row(s) of {name} have {lookup.column} "
                            f"{row['value']!r}, which map {lookup.map} lacks: no "
                            f"{derived_name} is computed for them",
                            f"add {row['value']!r} to {lookup.map} (its variable, e.g. "
                            "PLAN_MINUTES, or the pack's map) if it is a real plan",
                            rule=", ".join(r.name for r in users), table=name,
                            column=lookup.column, count=row["rows"]))

    def run(self, app_repo: Path | None = None) -> AuditReport:
        statuses = self.rules_and_overdue()
        self.uncovered_deadlines()
        cron_answer, clocks = self.cron()
        if app_repo is not None:
            repo_clocks, problems = app_repo_clocks(app_repo)
            clocks += repo_clocks
            for problem in problems:
                self.findings.append(Finding(Kind.CRON_UNREADABLE, Severity.INFO, problem,
                                             "fix the file, or check its crons by hand"))
        self.duplicate_clocks(clocks, statuses)
        ledger = self.ledger()
        self.unknown_values()
        cron_summary = {k: cron_answer.get(k) for k in ("installed", "readable", "error")}
        cron_summary["jobs"] = [{"job": c.job, "schedule": c.schedule, "active": c.active}
                                for c in clocks]
        return AuditReport(self.findings, statuses, ledger, cron_summary)


def format_report(report: AuditReport) -> str:
    """A readable table, actions first, then what to do about each finding."""
    lines = []
    ordered = sorted(report.findings, key=lambda f: f.severity is not Severity.ACTION)
    if ordered:
        rows = [("#", "severity", "kind", "where", "count", "finding")]
        for number, f in enumerate(ordered, 1):
            where = f.job or ".".join(p for p in (f.table, f.column) if p) or ""
            if f.rule and not f.job:
                where = f"{f.rule} @ {where}" if where else f.rule
            rows.append((str(number), f.severity.value, f.kind.value, where,
                         "" if f.count is None else str(f.count), f.message))
        lines.append(format_table(rows))
        lines.append("")
        lines.append("What to do:")
        lines += [f"{number:>3}. {f.advice}" for number, f in enumerate(ordered, 1)]
    else:
        lines.append("No findings.")
    ledger = report.ledger or {}
    lease = ledger.get("lease") or {}
    lateness = ledger.get("lateness_ms") or {}
    p99 = lateness.get("p99")
    lines.append("")
    lines.append(
        f"Rules: {sum(r.active for r in report.rules)} active of {len(report.rules)}. "
        f"Lease: {lease.get('holder') or 'nobody'}"
        f"{' (held)' if lease.get('held') else ''}. "
        f"Lateness p99 (24 h): {'-' if p99 is None else f'{p99:.0f} ms'} "
        f"over {lateness.get('count') or 0} action(s).")
    actions = len(report.actions)
    lines.append(f"{actions} action finding(s), {len(report.findings) - actions} info.")
    return "\n".join(lines)
