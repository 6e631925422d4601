"""The packs for the app's other tables: each on virtual time (replay, with the
shipped packs as they are), and on real PostgreSQL a pack whose table is
missing is inactive while the rest run."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from tests.helpers import iso, replay
from tests.live import LiveDaemon, eventually, insert_session, seed_people

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=timezone.utc)
USER = "22222222-2222-4222-8222-222222222222"
MECH = "11111111-1111-4111-8111-111111111111"


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def insert(table: str, row: dict, when: datetime = T0) -> dict:
    record = {k: iso(v) if isinstance(v, datetime) else v for k, v in row.items()}
    return {"at": iso(when), "type": "INSERT", "table": table, "record": record}


def update(table: str, row: dict, when: datetime) -> dict:
    return {**insert(table, row, when), "type": "UPDATE"}


def fired(lines: list[dict]) -> list[tuple]:
    return [(line["rule"], line["table"], line["row_id"],
             round((datetime.fromisoformat(line["at"].replace("Z", "+00:00")) - T0)
                   .total_seconds() / 60, 3), line.get("status"), line.get("webhook"))
            for line in lines]


# (pack, events, env, expected [(rule, table, row, minutes after T0, status, webhook)])
CASES = [
    ("scheduling: a hold lapses, a confirmed one does not",
     [insert("slot_reservations", {"id": "r1", "status": "reserved", "mechanic_id": USER,
                                   "expires_at": at(15)}),
      insert("slot_reservations", {"id": "r2", "status": "reserved", "mechanic_id": USER,
                                   "expires_at": at(15)}),
      update("slot_reservations", {"id": "r2", "status": "confirmed", "mechanic_id": USER,
                                   "expires_at": None}, at(5))],
     {}, [("reservation_expiry", "slot_reservations", "r1", 15, "expired", None)]),
    ("matching: an unstamped offer lapses 2 minutes after it was made; one with a deadline at it",
     [insert("session_assignments", {"id": "o1", "status": "offered", "mechanic_id": MECH,
                                     "offered_at": at(0)}),
      insert("session_assignments", {"id": "o2", "status": "offered", "mechanic_id": MECH,
                                     "offered_at": at(0), "expires_at": at(5)}),
      insert("session_assignments", {"id": "o3", "status": "queued", "offered_at": at(0)})],
     {}, [("offer_expiry_unstamped", "session_assignments", "o1", 2, "expired", None),
          ("offer_expiry", "session_assignments", "o2", 5, "expired", None)]),
    ("waitlist: a pending entry expires",
     [insert("customer_waitlist", {"id": "w1", "status": "pending", "customer_id": USER,
                                   "expires_at": at(60 * 24)})],
     {}, [("waitlist_expiry", "customer_waitlist", "w1", 60 * 24, "expired", None)]),
    ("credits: an available credit expires; one used first does not",
     [insert("customer_credits", {"id": "c1", "status": "available", "customer_user_id": USER,
                                  "expires_at": at(90)}),
      insert("customer_credits", {"id": "c2", "status": "available", "customer_user_id": USER,
                                  "expires_at": at(90)}),
      update("customer_credits", {"id": "c2", "status": "used", "customer_user_id": USER,
                                  "expires_at": at(90)}, at(30))],
     {}, [("credit_expiry", "customer_credits", "c1", 90, "expired", None)]),
    ("invites: a pending code expires",
     [insert("session_invites", {"id": "i1", "status": "pending", "expires_at": at(60)})],
     {}, [("session_invite_expiry", "session_invites", "i1", 60, "expired", None)]),
    ("rfq: the warning 24 h before the deadline, once, then the expiry",
     [insert("workshop_rfq_marketplace", {"id": "q1", "status": "open", "customer_id": USER,
                                          "bid_deadline": at(3 * 24 * 60)}),
      update("workshop_rfq_marketplace", {"id": "q1", "status": "open", "customer_id": USER,
                                          "bid_deadline": at(3 * 24 * 60), "title": "x"},
             at(2 * 24 * 60 + 30))],
     {}, [("rfq_deadline_warning", "workshop_rfq_marketplace", "q1", 2 * 24 * 60, None, None),
          ("rfq_expiry", "workshop_rfq_marketplace", "q1", 3 * 24 * 60, "expired", None)]),
    ("workshops: an application pending 48 hours alerts support",
     [insert("organizations", {"id": "g1", "status": "pending", "created_at": at(0)})],
     {}, [("workshop_application_stuck", "organizations", "g1", 48 * 60, None, None)]),
    ("accounts: suspensions end, whatever the table's status column is called",
     [insert("mechanics", {"id": MECH, "account_status": "suspended",
                           "suspended_until": "2026-03-03T10:00:00"}),
      insert("profiles", {"id": USER, "account_status": "suspended",
                          "suspended_until": at(60)})],
     {}, [("account_suspension_end", "profiles", USER, 60, "active", None),
          ("mechanic_suspension_end", "mechanics", MECH, 24 * 60, "active", None)]),
    ("repairs: a pending cost variance expires",
     [insert("quote_variance_requests", {"id": "v1", "status": "pending",
                                         "customer_id": USER, "expires_at": at(48 * 60)})],
     {}, [("variance_expiry", "quote_variance_requests", "v1", 48 * 60, "expired", None)]),
    ("corporate: an unpaid invoice is overdue the day after its due date",
     [insert("corporate_invoices", {"id": "n1", "status": "sent", "due_date": "2026-03-02",
                                    "paid_at": None}),
      insert("corporate_invoices", {"id": "n2", "status": "sent", "due_date": "2026-03-02",
                                    "paid_at": at(1)})],
     {}, [("invoice_overdue", "corporate_invoices", "n1", 14 * 60, "overdue", None)]),
    ("money (off by default): switched on, the app is told at the billing date",
     [insert("customer_subscriptions", {"id": "s1", "status": "active", "customer_id": USER,
                                        "next_billing_date": at(30)})],
     {"RULE_SUBSCRIPTION_CREDITS_DUE": "on"},
     [("subscription_credits_due", "customer_subscriptions", "s1", 30, None,
       "subscription.credits_due")]),
    ("money off: nothing is owed",
     [insert("customer_subscriptions", {"id": "s1", "status": "active", "customer_id": USER,
                                        "next_billing_date": at(30)})],
     {}, []),
]


@pytest.mark.parametrize("name, events, env, expected", CASES, ids=[c[0].split(":")[0] + str(i)
                                                                   for i, c in enumerate(CASES)])
def test_pack_case(name: str, events: list, env: dict, expected: list) -> None:
    lines, err = replay(events, env)
    assert sorted(fired(lines)) == sorted(expected), (name, err)


async def test_a_pack_whose_table_is_missing_is_inactive_and_the_rest_run(
        database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seed_people(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("drop table public.customer_waitlist cascade")
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        assert "waitlist_expiry" in live.listener.inactive
        assert "does not exist" in live.listener.inactive["waitlist_expiry"]
        assert "customer_waitlist" not in live.listener.queries
        sid = insert_session(database, status="pending")
        await eventually(lambda: any(r.key.row_key == sid for r in live.fired("request_expiry")))
    assert "rule_inactive" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # realtime 2.34 / websockets
async def test_a_pack_through_the_supabase_test_servers(database: str, tmp_path: Path) -> None:
    """A reservation hold written as the app writes it lapses through Realtime
    (its own binding on the one channel) and PostgREST RPC."""
    from listener import app_writes as app
    from tests.live_supabase import LiveSupabaseDaemon, prepare_supabase_database
    from tests.servers.postgrest_server import SupabaseStack

    seed_people(database)
    await prepare_supabase_database(database)
    async with SupabaseStack(database, realtime_options={
            "tables": ("public.sessions", "public.slot_reservations")}) as stack:
        async with LiveSupabaseDaemon(stack, tmp_path) as live:
            await live.active()
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                mechanic = await app.create_user(conn, "mo@example.com", "Mo Khan", "mechanic")
                start = datetime.now(timezone.utc) + timedelta(days=2)
                hold = await app.reserve_slot(conn, mechanic, start, start + timedelta(minutes=30))
                # The app's 15-minute hold, in the test's scaled time (1.5 s).
                await conn.execute("update public.slot_reservations set expires_at = now() "
                                   "+ interval '1.5 seconds' where id = %s", (hold,))
            await eventually(lambda: live.fired("reservation_expiry"), timeout=20)
            result = live.fired("reservation_expiry")[0]
            assert stack.realtime.changes_sent >= 1  # the pack's table streams on the channel
    assert (result.key.table, result.key.row_key, result.status) == (
        "slot_reservations", hold, "expired")
    with psycopg.connect(database) as conn:
        assert conn.execute("select status from public.slot_reservations where id = %s",
                            (hold,)).fetchone() == ("expired",)
