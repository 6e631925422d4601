"""The reference schema is the app's: packs are checked against it.

- reference/0002 applies on a fresh database, after 0001, and again;
- every table and column a shipped pack names exists there;
- every status a pack writes is one the table's CHECK (or enum) accepts,
  tried on a real row inside a rolled-back transaction;
- the app's write patterns (listener.app_writes) run and leave the rows the
  listener must cope with;
- each email a pack sends has a template that renders from the generic
  context.

The packs are read with tomllib and checked by hand against the rule format
(the loader is not used here).
"""
from __future__ import annotations

import pathlib
import re
import tomllib
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from jinja2 import Environment, PackageLoader, StrictUndefined
from psycopg import sql

from listener import app_writes, migrate
from listener.instants import parse_duration
from tests.conftest import scratch_database

PACKS = pathlib.Path(__file__).resolve().parent.parent / "listener" / "rules" / "packs"
TEMPLATES = pathlib.Path(__file__).resolve().parent.parent / "listener" / "templates"
# The sessions pack is the lead's; this file checks the packs of the app's other tables.
SESSIONS_PACK = "sessions.toml"
RULE_NAME = re.compile(r"[a-z0-9_]+")
LATENESS = {"notify_limit", "skip_past_quarter"}
RULE_KEYS = {"name", "table", "statuses", "present", "absent", "anchor", "offset", "set_status",
             "reason", "set", "notify", "webhook", "event", "lateness", "enabled", "description"}


def load_packs() -> dict[str, dict[str, Any]]:
    return {p.name: tomllib.loads(p.read_text(encoding="utf-8"))
            for p in sorted(PACKS.glob("*.toml")) if p.name != SESSIONS_PACK}


def all_rules() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(pack, rule, its table's declaration) for every rule of the packs."""
    return [(pack, rule, doc["tables"][rule["table"]])
            for pack, doc in load_packs().items() for rule in doc.get("rule", [])]


def rule_id(item: tuple[str, dict[str, Any], dict[str, Any]]) -> str:
    return item[1]["name"]


def recipient_columns(table: dict[str, Any]) -> list[str]:
    columns = []
    for sources in table.get("recipients", {}).values():
        for source in [sources] if isinstance(sources, str) else sources:
            kind, _, column = source.partition(":")
            assert kind in ("user", "mechanic"), source
            columns.append(column)
    return columns


# -- the packs' format, by hand ----------------------------------------------------------

def test_pack_rules_follow_the_format() -> None:
    names: dict[str, str] = {}
    for pack, rule, table in all_rules():
        name = rule["name"]
        assert RULE_NAME.fullmatch(name), name
        assert name not in names, f"{name} in {pack} and {names[name]}"
        names[name] = pack
        assert set(rule) <= RULE_KEYS, set(rule) - RULE_KEYS
        assert isinstance(rule["enabled"], bool), f"{name}: say on or off explicitly"
        assert rule["statuses"] and set(rule["statuses"]) <= set(table["known_statuses"]), name
        assert rule["anchor"], name
        offset = rule.get("offset", "0s")
        parse_duration(offset.lstrip("+-"))
        assert rule.get("lateness", "notify_limit") in LATENESS, name
        if "set_status" in rule:
            assert rule["set_status"] in table["known_statuses"], name
            assert rule.get("reason"), f"{name}: set_status needs a reason"
        assert rule.get("set_status") or rule.get("set") or rule.get("notify") \
            or rule.get("webhook"), f"{name} does nothing"
        for role in rule.get("notify", []):
            role = role.rstrip("?")
            assert role == "support" or role in table.get("recipients", {}), (name, role)
    assert len(names) >= 20


def test_every_money_rule_is_a_webhook_and_off() -> None:
    money = load_packs()["money.toml"]["rule"]
    assert money
    for rule in money:
        assert rule.get("webhook") and "set_status" not in rule and "set" not in rule, rule["name"]
        assert rule["enabled"] is False, rule["name"]


# -- the schema ---------------------------------------------------------------------------

def test_reference_list_picks_up_0002_after_0001() -> None:
    names = [m.name for m in migrate.reference_migrations()]
    assert names[:2] == ["0001_reference_app_schema.sql", "0002_app_schema.sql"]


def test_reference_schema_applies_on_a_fresh_database_and_again(pg_admin: str) -> None:
    with scratch_database(pg_admin, "listener_ref_") as conninfo:
        assert migrate.apply(conninfo, include_reference=True)
        # The reference files run on every --reference apply: they must repeat cleanly.
        assert migrate.apply(conninfo, include_reference=True) == []
        with psycopg.connect(conninfo) as conn:
            kind = conn.execute(
                "select data_type, udt_name from information_schema.columns where "
                "table_schema = 'public' and table_name = 'sessions' and column_name = 'type'"
            ).fetchone()
            suspended = conn.execute(
                "select data_type from information_schema.columns where table_schema = 'public' "
                "and table_name = 'mechanics' and column_name = 'suspended_until'").fetchone()
    assert kind == ("USER-DEFINED", "session_type")
    assert suspended == ("timestamp without time zone",)


def columns_of(conn: psycopg.Connection, table: str) -> set[str]:
    return {r[0] for r in conn.execute(
        "select column_name from information_schema.columns "
        "where table_schema = 'public' and table_name = %s", (table,))}


def test_sessions_keep_the_columns_the_listener_reads(database: str) -> None:
    with psycopg.connect(database) as conn:
        columns = columns_of(conn, "sessions")
    assert {"id", "status", "type", "plan", "customer_user_id", "mechanic_id", "created_at",
            "updated_at", "started_at", "ended_at", "cancelled_at", "scheduled_for",
            "expires_at", "duration_minutes", "waiver_signed_at", "reminder_24h_sent",
            "reminder_1h_sent", "reminder_15min_sent", "summary_submitted_at", "metadata",
            "status_changed_at"} <= columns
    assert "mechanic_user_id" not in columns  # no migration of the app adds it


@pytest.mark.parametrize("item", all_rules(), ids=rule_id)
def test_every_column_a_rule_names_exists(database: str, item: tuple) -> None:
    _, rule, table = item
    name = rule["table"]
    with psycopg.connect(database) as conn:
        columns = columns_of(conn, name)
    assert columns, f"table {name} is missing"
    wanted = {table.get("key", "id"), table.get("status", "status"),
              *rule.get("present", []), *rule.get("absent", []), *rule["anchor"],
              *rule.get("set", {}), *recipient_columns(table)}
    assert wanted <= columns, wanted - columns


# -- every status a rule writes is allowed ---------------------------------------------

class World:
    """The rows other rows point at, made the app's way."""

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        self.conn = conn
        self.ids: dict[str, str] = {}
        self.made = 0  # rows made so far: keeps emails, slots and numbers unique

    async def setup(self) -> "World":
        c = self.conn
        self.ids["customer"] = await app_writes.create_user(c, "carla@example.com", "Carla Diaz")
        self.ids["mechanic"], self.ids["mechanic_user"] = await app_writes.create_mechanic(
            c, "mo@example.com", "Mo Khan")
        self.ids["session"] = await app_writes.insert_paid_session(c, self.ids["customer"])
        self.ids["organization"] = await app_writes.create_workshop(
            c, "Fix It", "shop@example.com", self.ids["mechanic_user"])
        self.ids["rfq"] = await app_writes.create_rfq(
            c, self.ids["customer"], self.ids["mechanic"], "Brakes squeal")
        self.ids["quote"] = await self.key(
            "insert into public.repair_quotes (customer_id, mechanic_id, subtotal, "
            "platform_fee_percent, platform_fee_amount, customer_total, provider_receives, "
            "sent_at) values (%s, %s, 100, 12, 12, 112, 88, now()) returning id",
            self.ids["customer"], self.ids["mechanic"])
        self.ids["plan"] = await self.key(
            "insert into public.service_plans (slug, name, duration_minutes) "
            "values ('monthly', 'Monthly', 30) returning id")
        self.ids["corporate"] = await self.key(
            "insert into public.corporate_businesses (company_name, company_email) "
            "values ('Fleet Co', 'fleet@example.com') returning id")
        return self

    async def key(self, query: str, *params: Any) -> str:
        cur = await self.conn.execute(query, params)
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    async def row_in(self, table: str, status: str) -> str:
        """A new row of `table` whose status column holds `status`."""
        i = self.ids
        k = self.key
        self.made += 1
        n = self.made
        if table == "session_assignments":
            return await k("insert into public.session_assignments (session_id, mechanic_id, "
                           "status, offered_at) values (%s, %s, %s, now()) returning id",
                           i["session"], i["mechanic"], status)
        if table == "slot_reservations":
            start = datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(hours=n)
            return await k("insert into public.slot_reservations (mechanic_id, start_time, "
                           "end_time, status, expires_at) values (%s, %s, %s, %s, now()) "
                           "returning id", i["mechanic_user"], start, start + timedelta(minutes=45),
                           status)
        if table == "customer_waitlist":
            return await k("insert into public.customer_waitlist (customer_id, status) "
                           "values (%s, %s) returning id", i["customer"], status)
        if table == "customer_credits":
            return await k("insert into public.customer_credits (customer_user_id, amount, type, "
                           "status, expires_at) values (%s, 10, 'no_show_credit', %s, now()) "
                           "returning id", i["customer"], status)
        if table == "workshop_rfq_marketplace":
            rfq = await app_writes.create_rfq(self.conn, i["customer"], i["mechanic"], "Noise")
            await self.conn.execute(sql.SQL("update public.workshop_rfq_marketplace "
                                            "set status = {} where id = %s").format(
                sql.Literal(status)), (rfq,))
            return rfq
        if table == "session_invites":
            invite, _ = await app_writes.create_session_invite(
                self.conn, i["session"], "customer", i["customer"])
            await self.conn.execute(sql.SQL("update public.session_invites set status = {} "
                                            "where id = %s").format(sql.Literal(status)), (invite,))
            return invite
        if table == "mechanics":
            mechanic, _ = await app_writes.create_mechanic(
                self.conn, f"m{n}@example.com", "Sam")
            await self.conn.execute("update public.mechanics set account_status = %s, "
                                    "suspended_until = now() where id = %s", (status, mechanic))
            return mechanic
        if table == "profiles":
            user = await app_writes.create_user(self.conn, f"u{n}@example.com")
            await self.conn.execute("update public.profiles set account_status = %s, "
                                    "suspended_until = now() where id = %s", (status, user))
            return user
        if table == "quote_variance_requests":
            return await k("insert into public.quote_variance_requests (original_quote_id, "
                           "customer_id, original_total_cost, revised_total_cost, variance_reason, "
                           "detailed_explanation, status, expires_at) values "
                           "(%s, %s, 100, 130, 'additional_parts_needed', 'rotors', %s, now()) "
                           "returning id", i["quote"], i["customer"], status)
        if table == "corporate_invoices":
            return await k("insert into public.corporate_invoices (invoice_number, corporate_id, "
                           "billing_period_start, billing_period_end, status, due_date) values "
                           "(%s, %s, '2030-01-01', '2030-01-31', %s, '2030-02-15') returning id",
                           f"INV-{n}", i["corporate"], status)
        if table == "repair_jobs":
            quote = await k("insert into public.repair_quotes (customer_id, subtotal, "
                            "platform_fee_percent, platform_fee_amount, customer_total, "
                            "provider_receives) values (%s, 1, 1, 1, 1, 1) returning id",
                            i["customer"])
            return await k("insert into public.repair_jobs (repair_quote_id, customer_id, "
                           "description, status, quote_accepted_at, pickup_scheduled_at, "
                           "ready_for_pickup_at) values (%s, %s, 'brakes', %s, now(), now(), "
                           "now()) "
                           "returning id", quote, i["customer"], status)
        raise AssertionError(f"no row builder for {table}: add one")


def writing_rules() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return [item for item in all_rules() if "set_status" in item[1] or "set" in item[1]]


@pytest.mark.parametrize("item", writing_rules(), ids=rule_id)
async def test_every_status_a_rule_writes_is_allowed(database: str, item: tuple) -> None:
    _, rule, table = item
    name, key, status_column = rule["table"], table.get("key", "id"), table.get("status", "status")
    async with await psycopg.AsyncConnection.connect(database) as conn:
        world = await World(conn).setup()
        for status in rule["statuses"]:
            row = await world.row_in(name, status)
            sets = dict(rule.get("set", {}))
            if "set_status" in rule:
                sets[status_column] = rule["set_status"]
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(col), sql.Literal(value))
                for col, value in sets.items())
            async with conn.transaction(force_rollback=True):
                cur = await conn.execute(sql.SQL("update {} set {} where {} = %s").format(
                    sql.Identifier("public", name), assignments, sql.Identifier(key)), (row,))
                assert cur.rowcount == 1
        await conn.rollback()


async def test_the_check_catches_a_status_the_table_does_not_allow(database: str) -> None:
    """The test above can fail: the statuses the app's own jobs write are refused."""
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        world = await World(conn).setup()
        invite = await app_writes.invite_mechanic(
            conn, world.ids["organization"], "new@example.com", world.ids["mechanic_user"])
        refused = [
            ("sessions", world.ids["session"], "status", "cancelled_no_show"),
            ("sessions", world.ids["session"], "status", "accepted"),
            ("sessions", world.ids["session"], "status", "reconnecting"),
            ("organization_members", invite, "status", "expired"),
            ("session_assignments", await world.row_in("session_assignments", "queued"),
             "status", "ended"),
        ]
        for table, key, column, status in refused:
            with pytest.raises(psycopg.errors.CheckViolation):
                await conn.execute(sql.SQL("update {} set {} = %s where id = %s").format(
                    sql.Identifier("public", table), sql.Identifier(column)), (status, key))


# -- the app's write patterns --------------------------------------------------------------

async def session_row(conn: psycopg.AsyncConnection, session_id: str) -> dict[str, Any]:
    cur = await conn.execute(
        "select status, mechanic_id::text, started_at, expires_at, duration_minutes, ended_at, "
        "scheduled_for, waiver_signed_at from public.sessions where id = %s", (session_id,))
    names = [d.name for d in cur.description]
    row = await cur.fetchone()
    assert row is not None
    return dict(zip(names, row))


async def test_on_demand_session_as_the_app_writes_it(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        customer = await app_writes.create_user(conn, "carla@example.com", "Carla Diaz")
        mechanic, _ = await app_writes.create_mechanic(conn, "mo@example.com", "Mo Khan")
        other, _ = await app_writes.create_mechanic(conn, "al@example.com", "Al")
        sid = await app_writes.insert_paid_session(conn, customer, type="video", plan="video15")
        assert (await session_row(conn, sid))["status"] == "pending"

        offers = await app_writes.offer_session(conn, sid, [other])
        await app_writes.accept_session(conn, sid, mechanic)
        row = await session_row(conn, sid)
        assert (row["status"], row["mechanic_id"]) == ("waiting", mechanic)

        assert await app_writes.start_session(conn, sid)
        row = await session_row(conn, sid)
        assert row["status"] == "live" and row["started_at"] is not None
        assert row["expires_at"] is None and row["duration_minutes"] == 0

        # At the app's HEAD the extension row is never written, and expires_at
        # lands at started_at + 15 min: 45 minutes before the plan's end.
        await app_writes.extend_session(conn, sid, 15, "pi_1", extension_row=False)
        row = await session_row(conn, sid)
        assert row["duration_minutes"] == 15
        assert row["expires_at"] == row["started_at"] + timedelta(minutes=15)
        cur = await conn.execute("select count(*) from public.session_extensions "
                                 "where session_id = %s", (sid,))
        assert (await cur.fetchone())[0] == 0

        await app_writes.extend_session(conn, sid, 10, "pi_2")
        await app_writes.extend_session(conn, sid, 10, "pi_2")  # Stripe retries the event
        cur = await conn.execute("select count(*), sum(minutes) from public.session_extensions "
                                 "where session_id = %s", (sid,))
        assert await cur.fetchone() == (1, 10)

        assert await app_writes.end_session(conn, sid)
        row = await session_row(conn, sid)
        assert row["status"] == "completed" and row["ended_at"] is not None
        cur = await conn.execute("select id::text, status from public.session_assignments "
                                 "where session_id = %s", (sid,))
        statuses = dict(await cur.fetchall())
        # 'ended' is refused by the CHECK: the targeted offer stays 'offered'.
        assert statuses == {offers.targeted[0]: "offered", offers.broadcast: "accepted"}


async def test_scheduled_session_with_the_waiver(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        customer = await app_writes.create_user(conn, "carla@example.com", "Carla Diaz")
        mechanic, _ = await app_writes.create_mechanic(conn, "mo@example.com", "Mo Khan")
        when = datetime.now(timezone.utc) + timedelta(days=2)
        sid = await app_writes.insert_paid_session(conn, customer, plan="diagnostic",
                                                   type="diagnostic", scheduled_for=when,
                                                   preferred_mechanic_id=mechanic)
        await app_writes.offer_session(conn, sid, [])
        await app_writes.accept_session(conn, sid, mechanic)
        row = await session_row(conn, sid)
        assert (row["status"], row["mechanic_id"]) == ("scheduled", mechanic)
        assert await app_writes.sign_waiver(conn, sid, " Carla Diaz ")
        assert not await app_writes.sign_waiver(conn, sid, "again")
        row = await session_row(conn, sid)
        assert row["status"] == "waiting" and row["waiver_signed_at"] is not None
        assert row["scheduled_for"] == when

        await app_writes.record_no_show_compensation(conn, sid, 50.0, 35.0)
        cur = await conn.execute("select status, amount, expires_at > now() + interval '89 days' "
                                 "from public.customer_credits where session_id = %s", (sid,))
        assert [tuple(r) for r in await cur.fetchall()] == [("available", 15, True)]
        cur = await conn.execute("select status from public.mechanic_earnings "
                                 "where session_id = %s", (sid,))
        assert [r[0] for r in await cur.fetchall()] == ["pending_payout"]


async def test_pack_tables_as_the_app_writes_them(database: str) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        customer = await app_writes.create_user(conn, "carla@example.com", "Carla Diaz")
        mechanic, mechanic_user = await app_writes.create_mechanic(conn, "mo@example.com", "Mo")
        sid = await app_writes.insert_paid_session(conn, customer)

        start = datetime(2030, 1, 1, 10, tzinfo=timezone.utc)
        hold = await app_writes.reserve_slot(conn, mechanic_user, start, start + timedelta(hours=1))
        cur = await conn.execute("select expires_at - created_at from public.slot_reservations "
                                 "where id = %s", (hold,))
        assert (await cur.fetchone())[0] == timedelta(minutes=15)
        await app_writes.confirm_reservation(conn, hold, sid)
        cur = await conn.execute("select status, expires_at, confirmed_at is not null "
                                 "from public.slot_reservations where id = %s", (hold,))
        assert await cur.fetchone() == ("confirmed", None, True)

        entry = await app_writes.join_waitlist(conn, customer, "carla@example.com", "Carla")
        cur = await conn.execute("select status, expires_at - created_at "
                                 "from public.customer_waitlist where id = %s", (entry,))
        assert await cur.fetchone() == ("pending", timedelta(hours=24))

        invite, code = await app_writes.create_session_invite(conn, sid, "mechanic", customer)
        assert await app_writes.redeem_session_invite(conn, code, mechanic_user)
        assert not await app_writes.redeem_session_invite(conn, code, mechanic_user)

        org = await app_writes.create_workshop(conn, "Fix It", "shop@example.com", mechanic_user)
        member = await app_writes.invite_mechanic(conn, org, "new@example.com", mechanic_user)
        cur = await conn.execute("select status, user_id, invite_expires_at - invited_at "
                                 "from public.organization_members where id = %s", (member,))
        status, user, lifetime = await cur.fetchone()
        assert (status, user) == ("pending", None)
        assert abs(lifetime - timedelta(days=7)) < timedelta(seconds=1)

        rfq = await app_writes.create_rfq(conn, customer, mechanic, "Brakes", bid_deadline_hours=24)
        await conn.execute("update public.workshop_rfq_marketplace set status = 'expired' "
                           "where id = %s", (rfq,))
        cur = await conn.execute("select e.status from public.workshop_escalation_queue e "
                                 "where e.rfq_marketplace_id = %s", (rfq,))
        assert (await cur.fetchone())[0] == "declined"  # the app's trigger follows the RFQ

        await app_writes.start_cooling_period(conn, mechanic)
        cur = await conn.execute(
            "select account_status, abs(extract(epoch from (suspended_until at time zone 'UTC') "
            "- (now() + interval '30 days'))) < 5 from public.mechanics where id = %s", (mechanic,))
        assert await cur.fetchone() == ("suspended", True)

        await app_writes.suspend_user(conn, customer, 7)
        cur = await conn.execute("select account_status from public.profiles where id = %s",
                                 (customer,))
        assert (await cur.fetchone())[0] == "suspended"


# -- templates ----------------------------------------------------------------------------

def notified() -> list[tuple[str, str, dict[str, Any]]]:
    """(rule, role, rule) for every email a pack sends."""
    return [(rule["name"], role.rstrip("?"), rule) for _, rule, _ in all_rules()
            for role in rule.get("notify", [])]


@pytest.mark.parametrize("name,role", [(n, r) for n, r, _ in notified()],
                         ids=[f"{n}.{r}" for n, r, _ in notified()])
def test_every_email_has_a_template_that_renders(name: str, role: str) -> None:
    assert (TEMPLATES / f"{name}.{role}.j2").exists()
    env = Environment(loader=PackageLoader("listener", "templates"), undefined=StrictUndefined,
                      autoescape=False, trim_blocks=True, lstrip_blocks=True)
    template = env.get_template(f"{name}.{role}.j2")
    context = {"row": {"title": "Brakes squeal", "amount": "15.00", "bid_count": 2,
                       "invite_email": "new@example.com", "name": "Fix It"},
               "label": "item", "short_id": "1234abcd", "link": "https://app.example/x",
               "recipient_name": "Carla", "anchor_at": "Mon 2 Mar 2026, 10:00 UTC",
               "duration": "24 hours", "rule": name, "role": role}
    for block in ("subject", "content", "text"):
        text = "".join(template.blocks[block](template.new_context(context))).strip()
        assert text, (name, block)
    bare = dict(context, row={})  # every row value is optional
    assert "".join(template.blocks["subject"](template.new_context(bare))).strip()
