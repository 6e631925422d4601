"""`listener demo`: the daemon on the embedded database, plus a simulator that
plays the app's own writes (checkout, accept, start, extension, end, waiver,
reservations, invites, RFQs, suspensions, ...) with every threshold scaled
down, until every active rule has fired; then a summary table.

The demo writes to the embedded database `listener run` and `listener report`
use (its app tables and ledger are emptied first), so `listener report`
afterwards shows what the demo did.

A deadline the app computes itself (a hold's `expires_at`, an RFQ's
`bid_deadline`) is real time, not scaled; the simulator moves such a column
right after the app's write, so the rule comes due within the demo.
"""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Awaitable, Callable

import psycopg
from psycopg import sql

from listener import app_writes as app
from listener.executor import ActionResult
from listener.instants import SECOND
from listener.rules.model import Outcome, RuleSet
from listener.settings import Settings
from listener.tables import format_table

DEMO_SCALE = 1440  # one day of rules in one minute
LEAD_S = 4.0  # how far ahead a retimed deadline is set


def reset_app_data(conninfo: str) -> None:
    """Empty the app's tables and the ledger, keeping the schema and migrations."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "select format('%I.%I', schemaname, tablename) from pg_tables "
            "where (schemaname = 'public' and tablename not like 'listener\\_%') "
            "or (schemaname = 'auth' and tablename = 'users')")]
        tables.append("public.listener_ledger")
        conn.execute("truncate " + ", ".join(tables) + " cascade")


class Simulator:
    """Plays lifecycles through the app's own writes, on scaled time."""

    def __init__(self, conninfo: str, ruleset: RuleSet) -> None:
        self.conninfo = conninfo
        self.ruleset = ruleset
        self.scale = ruleset.time_scale
        self.people: dict[str, str] = {}

    def seconds(self, minutes: float) -> float:
        return minutes * 60 / self.scale

    async def sleep(self, minutes: float) -> None:
        await asyncio.sleep(self.seconds(minutes))

    async def _conn(self) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)

    async def seed_people(self) -> None:
        async with await self._conn() as conn:
            self.people["customer"] = await app.create_user(conn, "carla@example.com", "Carla Diaz")
            self.people["mechanic"], self.people["mechanic_user"] = await app.create_mechanic(
                conn, "mo@example.com", "Mo Khan")
            self.people["mechanic2"], self.people["mechanic2_user"] = await app.create_mechanic(
                conn, "ana@example.com", "Ana Silva")

    async def retime(self, rule_name: str, key: str, lead_s: float = LEAD_S) -> None:
        """Move a rule's anchor column so that its deadline comes `lead_s` from now."""
        rule = self.ruleset.by_name(rule_name)
        table = self.ruleset.tables[rule.table]
        column = rule.anchor[0]
        seconds = lead_s - rule.offset / SECOND
        async with await self._conn() as conn:
            kind = (await (await conn.execute(
                "select data_type from information_schema.columns where table_schema = 'public' "
                "and table_name = %s and column_name = %s", (rule.table, column))).fetchone())[0]
            value = datetime.now(timezone.utc) + timedelta(seconds=seconds)
            if kind == "date":
                value = value.date()  # type: ignore[assignment]
            elif kind == "timestamp without time zone":
                value = value.replace(tzinfo=None)
            await conn.execute(sql.SQL("update {} set {} = %s where {} = %s").format(
                sql.Identifier("public", rule.table), sql.Identifier(column),
                sql.Identifier(table.key)), (value, key))

    # -- sessions -----------------------------------------------------------------------

    async def nobody_accepts(self) -> None:
        async with await self._conn() as conn:
            await app.insert_paid_session(conn, self.people["customer"], type="chat")

    async def slow_mechanic_then_extension(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], type="video",
                                                plan="video15")
            await self.sleep(1)
            await app.accept_session(conn, sid, self.people["mechanic"])
            await self.sleep(6)  # nudged at 3 minutes, support alerted at 5
            await app.start_session(conn, sid)
            await self.sleep(20)
            # A paid extension: 15 more minutes, and the app's too early expires_at
            # (started_at + 15 minutes; moved to scaled time like every deadline
            # the app computes itself).
            await app.extend_session(conn, sid, 15, f"pi_demo_{uuid.uuid4().hex[:10]}")
            await conn.execute("update public.sessions set expires_at = started_at "
                               "+ make_interval(secs => %s) where id = %s",
                               (self.seconds(15), sid))
            # The plan end (45 + 15 minutes after the start) ends it; the mechanic
            # never writes the summary.

    async def mechanic_never_starts(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], type="diagnostic",
                                                plan="diagnostic")
            await app.accept_session(conn, sid, self.people["mechanic"])

    async def three_hour_limit(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], type="video",
                                                plan="diagnostic")
            await app.accept_session(conn, sid, self.people["mechanic"])
            await app.start_session(conn, sid)
            # Long extensions: the plan would run past 3 hours, the limit ends it first.
            await app.extend_session(conn, sid, 90, f"pi_demo_{uuid.uuid4().hex[:10]}")
            await app.extend_session(conn, sid, 60, f"pi_demo_{uuid.uuid4().hex[:10]}")
            await self.sleep(3 * 60 + 40)
            await conn.execute("update public.sessions set summary_submitted_at = now() "
                               "where id = %s", (sid,))

    async def booked_no_show(self) -> None:
        async with await self._conn() as conn:
            start = datetime.now(timezone.utc) + timedelta(seconds=self.seconds(24 * 60 + 20))
            sid = await app.insert_paid_session(conn, self.people["customer"], type="video",
                                                plan="video15", scheduled_for=start)
            await app.accept_session(conn, sid, self.people["mechanic"])
            await self.sleep(24 * 60)  # the 24 h reminder went out
            await app.sign_waiver(conn, sid, "Carla Diaz")
            # Nobody joins: reminders at 1 h and 15 min, then the no-show.

    async def happy_path(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], type="chat",
                                                plan="chat10")
            await self.sleep(0.5)
            await app.accept_session(conn, sid, self.people["mechanic"])
            await self.sleep(1)
            await app.start_session(conn, sid)
            await self.sleep(20)
            await app.end_session(conn, sid)
            await self.sleep(40)  # the summary reminder (30 minutes) went out
            await conn.execute("update public.sessions set summary_submitted_at = now() "
                               "where id = %s", (sid,))

    # -- the other packs ------------------------------------------------------------------

    async def offers(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], type="chat")
            # The app's offers carry no deadline: they lapse 2 minutes after offered_at.
            await app.offer_session(conn, sid, [self.people["mechanic"]])
            # An offer with a deadline of its own (the column the app never fills).
            await conn.execute(
                "insert into public.session_assignments (session_id, mechanic_id, status, "
                "offered_at, expires_at, metadata) values (%s, %s, 'offered', now(), "
                "now() + make_interval(secs => %s), '{\"match_type\": \"targeted\"}')",
                (sid, self.people["mechanic2"], LEAD_S))

    async def reservation(self) -> None:
        async with await self._conn() as conn:
            soon = datetime.now(timezone.utc) + timedelta(days=2)
            rid = await app.reserve_slot(conn, self.people["mechanic_user"], soon,
                                         soon + timedelta(minutes=30))
        await self.retime("reservation_expiry", rid)

    async def waitlist(self) -> None:
        async with await self._conn() as conn:
            wid = await app.join_waitlist(conn, self.people["customer"], "carla@example.com",
                                          "Carla Diaz")
        await self.retime("waitlist_expiry", wid, LEAD_S + 1)

    async def credit(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], plan="chat10")
            await conn.execute("update public.sessions set mechanic_id = %s, status = 'cancelled' "
                               "where id = %s", (self.people["mechanic"], sid))
            await app.record_no_show_compensation(conn, sid, 30.0, 15.0)
            row = await (await conn.execute("select id from public.customer_credits "
                                            "where session_id = %s", (sid,))).fetchone()
        await self.retime("credit_expiry", str(row[0]), LEAD_S + 2)

    async def invite(self) -> None:
        async with await self._conn() as conn:
            sid = await app.insert_paid_session(conn, self.people["customer"], plan="chat10")
            iid, _ = await app.create_session_invite(conn, sid, "customer",
                                                     self.people["customer"])
        await self.retime("session_invite_expiry", iid, LEAD_S + 3)

    async def rfq(self) -> None:
        async with await self._conn() as conn:
            rid = await app.create_rfq(conn, self.people["customer"], self.people["mechanic"],
                                       "Brakes squeal")
        # The warning comes 24 hours (scaled) before the deadline, the expiry at it.
        await self.retime("rfq_deadline_warning", rid, LEAD_S)

    async def workshop(self) -> None:
        async with await self._conn() as conn:
            oid = await app.create_workshop(conn, "Fix It Fast", "shop@example.com",
                                            self.people["customer"])
        await self.retime("workshop_application_stuck", oid, LEAD_S + 5)

    async def suspensions(self) -> None:
        async with await self._conn() as conn:
            await app.start_cooling_period(conn, self.people["mechanic2"])
            await app.suspend_user(conn, self.people["customer"], 3)
        await self.retime("mechanic_suspension_end", self.people["mechanic2"], LEAD_S + 6)
        await self.retime("account_suspension_end", self.people["customer"], LEAD_S + 6)

    async def variance(self) -> None:
        async with await self._conn() as conn:
            quote = await (await conn.execute(
                "insert into public.repair_quotes (customer_id, subtotal, platform_fee_percent, "
                "platform_fee_amount, customer_total, provider_receives, status, sent_at) values "
                "(%s, 200, 10, 20, 220, 200, 'approved', now()) returning id",
                (self.people["customer"],))).fetchone()
            vid = await (await conn.execute(
                "insert into public.quote_variance_requests (original_quote_id, customer_id, "
                "original_total_cost, revised_total_cost, variance_reason, detailed_explanation, "
                "status, expires_at) values (%s, %s, 220, 300, 'additional_parts_needed', "
                "'a worn caliper', 'pending', now() + interval '48 hours') returning id",
                (quote[0], self.people["customer"]))).fetchone()
        await self.retime("variance_expiry", str(vid[0]), LEAD_S + 7)

    async def invoice(self) -> None:
        async with await self._conn() as conn:
            corp = await (await conn.execute(
                "insert into public.corporate_businesses (company_name, company_email) "
                "values ('Fleet Co', %s) returning id",
                (f"fleet-{uuid.uuid4().hex[:6]}@example.com",))).fetchone()
            iid = await (await conn.execute(
                "insert into public.corporate_invoices (invoice_number, corporate_id, "
                "billing_period_start, billing_period_end, total_amount, status, sent_at, "
                "due_date) values (%s, %s, current_date - 30, current_date, 1200, 'sent', now(), "
                "current_date + 14) returning id",
                (f"INV-{uuid.uuid4().hex[:6]}", corp[0]))).fetchone()
        # A date deadline: due the day after due_date (one scaled day: a minute).
        await self.retime("invoice_overdue", str(iid[0]), LEAD_S + 8)

    def lifecycles(self) -> list[Callable[[], Awaitable[None]]]:
        plays = [self.nobody_accepts, self.slow_mechanic_then_extension,
                 self.mechanic_never_starts, self.three_hour_limit, self.booked_no_show,
                 self.happy_path]
        active = {r.name for r in self.ruleset.rules}
        by_rule = {"offer_expiry": self.offers, "reservation_expiry": self.reservation,
                   "waitlist_expiry": self.waitlist, "credit_expiry": self.credit,
                   "session_invite_expiry": self.invite, "rfq_deadline_warning": self.rfq,
                   "workshop_application_stuck": self.workshop,
                   "mechanic_suspension_end": self.suspensions,
                   "variance_expiry": self.variance, "invoice_overdue": self.invoice}
        plays += [play for rule, play in by_rule.items() if rule in active]
        return plays


def describe(result: ActionResult, started: float) -> str:
    what = []
    if result.status:
        what.append(f"set {result.status} ({result.reason})")
    if result.recipients and result.outcome is Outcome.FIRED:
        what.append("emailed " + ", ".join(result.recipients))
    if result.webhook:
        what.append(f"webhook {result.webhook}")
    if result.outcome is not Outcome.FIRED:
        what.append(result.outcome.value)
    key = result.key
    return (f"+{time.monotonic() - started:6.1f}s  {key.rule:<28} {key.table:<22} "
            f"{key.row_key[:8]}  {result.lateness_ms:>5} ms after due  {'; '.join(what)}")


def summary_table(results: list[ActionResult], ruleset: RuleSet,
                  inactive: dict[str, str]) -> str:
    rows = [("pack", "rule", "table", "fired", "p50 lateness", "max lateness", "")]
    for rule in ruleset.all_rules:
        mine = [r.lateness_ms for r in results if r.key.rule == rule.name]
        note = ("inactive: " + inactive[rule.name] if rule.name in inactive
                else "" if rule.enabled else "off by default")
        rows.append((rule.pack, rule.name, rule.table, str(len(mine)),
                     f"{statistics.median(mine):.0f} ms" if mine else "-",
                     f"{max(mine)} ms" if mine else "-", note))
    return format_table(rows)


async def run_demo(settings: Settings, ruleset: RuleSet, out: Callable[[str], None],
                   timeout_s: float = 240.0) -> bool:
    from listener import migrate
    from listener.adapters.email_outbox import OutboxSender
    from listener.rules.query import table_queries
    from listener.runtime import ConfigError, assemble, embedded_conninfo

    conninfo = await asyncio.to_thread(embedded_conninfo, settings.listener_data_dir)
    queries = table_queries(ruleset, settings.max_notify_lateness)
    await asyncio.to_thread(migrate.apply, conninfo, True, queries)
    await asyncio.to_thread(reset_app_data, conninfo)
    outbox = settings.email_outbox or settings.listener_data_dir / "demo-outbox"
    settings = settings.model_copy(update={
        "support_email": settings.support_email or "support@example.com"})
    results: list[ActionResult] = []
    expected: set[str] = set()
    all_fired = asyncio.Event()
    started = time.monotonic()

    def on_result(result: ActionResult) -> None:
        results.append(result)
        out(describe(result, started))
        if expected and {r.key.rule for r in results} >= expected:
            all_fired.set()

    try:
        async with assemble(settings, ruleset, on_result=on_result, holder="demo",
                            sender=OutboxSender(outbox), email_rate=50) as listener:
            active = listener.ruleset
            expected.update(r.name for r in active.rules)
            out(f"listener demo: {len(active)} active rules on {len(listener.queries)} tables, "
                f"every duration divided by {ruleset.time_scale:g}; emails go to {outbox}/")
            stop = asyncio.Event()
            runner = asyncio.create_task(listener.daemon.run(stop))
            ready = asyncio.ensure_future(listener.daemon.events.active.wait())
            await asyncio.wait([ready, runner], return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                ready.cancel()
                runner.result()  # the reason it died
                out("the daemon stopped before it was ready")
                return False
            sim = Simulator(conninfo, active)
            await sim.seed_people()
            plays = [asyncio.create_task(play()) for play in sim.lifecycles()]
            try:
                waiting = asyncio.ensure_future(all_fired.wait())
                await asyncio.wait([waiting, runner], timeout=timeout_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
            finally:
                for play in plays:
                    play.cancel()
                failed = [p for p in await asyncio.gather(*plays, return_exceptions=True)
                          if isinstance(p, Exception)]
                stop.set()
                await runner
            for exc in failed:
                out(f"a lifecycle failed: {exc!r}")
            out("")
            out(summary_table(results, ruleset, listener.inactive))
            missing = sorted(expected - {x.key.rule for x in results})
    except ConfigError as exc:
        out(f"listener demo: {exc}")
        return False
    emails = len(list(Path(outbox).glob("*.json")))
    out(f"\n{len(results)} actions, {emails} emails in {outbox}/, ledger in table "
        f"public.listener_ledger of the embedded database ({settings.listener_data_dir}/pg); "
        "`listener report --out report.html` shows it")
    if missing:
        out(f"rules that did not fire within {timeout_s:.0f} s: {', '.join(missing)}")
    return not missing
