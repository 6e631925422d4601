"""The app's own writes, as small psycopg functions, for the demo and the tests.

Each function writes what one route of the app (The Auto Doctor) writes, with
its quirks, so the listener is exercised against the rows it will really see:
a session goes live with neither `expires_at` nor `duration_minutes`; a paid
extension sets an `expires_at` that is too early; acceptance moves `pending`
to `waiting`, never to `accepted`; a scheduled session waits in `waiting`
once its waiver is signed. The comment of each function names the route it
follows. Times are the database's `now()`, as the app's are the server's.

Every function takes an open `psycopg.AsyncConnection` and leaves the
transaction to the caller (autocommit connections commit each statement).
"""
from __future__ import annotations

import secrets
import string
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb


async def _one(conn: psycopg.AsyncConnection, sql: str,
               params: tuple | dict = ()) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        return await cur.fetchone() if cur.description else None


async def _key(conn: psycopg.AsyncConnection, sql: str, params: tuple | dict = ()) -> str:
    row = await _one(conn, sql, params)
    assert row is not None
    return str(row["id"])


# -- people ------------------------------------------------------------------------------

async def create_user(conn: psycopg.AsyncConnection, email: str, full_name: str | None = None,
                      role: str = "customer") -> str:
    """An auth user and its profile, as Supabase Auth signup and the app's
    profile trigger leave them."""
    user_id = await _key(conn, "insert into auth.users (email) values (%s) returning id", (email,))
    await conn.execute(
        "insert into public.profiles (id, email, full_name, role) values (%s, %s, %s, %s)",
        (user_id, email, full_name, role))
    return user_id


async def create_mechanic(conn: psycopg.AsyncConnection, email: str, name: str) -> tuple[str, str]:
    """A mechanic: auth user, profile and `mechanics` row (mechanics.id is not
    the user id). Returns (mechanic id, user id)."""
    user_id = await create_user(conn, email, name, role="mechanic")
    mechanic_id = await _key(
        conn, "insert into public.mechanics (user_id, name, email, account_status) "
              "values (%s, %s, %s, 'active') returning id", (user_id, name, email))
    return mechanic_id, user_id


# -- sessions ----------------------------------------------------------------------------

async def insert_paid_session(conn: psycopg.AsyncConnection, customer_user_id: str, *,
                              type: str = "chat", plan: str = "chat10",
                              scheduled_for: datetime | None = None,
                              preferred_mechanic_id: str | None = None,
                              stripe_session_id: str | None = None) -> str:
    """The session row checkout creates (src/lib/sessionFactory.ts): `pending`,
    or `scheduled` with scheduled_for for an appointment; a chosen mechanic
    is only a metadata key until one accepts. No mechanic_id, started_at,
    expires_at; duration_minutes keeps its default 0."""
    metadata: dict[str, Any] = {"payment_method": "stripe", "urgent": False, "source": "intake"}
    if preferred_mechanic_id:
        metadata["preferred_mechanic_id"] = preferred_mechanic_id
    if scheduled_for is not None:
        metadata["scheduled_for_original"] = scheduled_for.isoformat()
        metadata["is_scheduled"] = True
    return await _key(
        conn,
        "insert into public.sessions (customer_user_id, type, status, plan, scheduled_for, "
        "stripe_session_id, ended_at, metadata) values (%s, %s, %s, %s, %s, %s, null, %s) "
        "returning id",
        (customer_user_id, type, "scheduled" if scheduled_for else "pending", plan, scheduled_for,
         stripe_session_id or f"cs_test_{uuid.uuid4().hex}", Jsonb(metadata)))


@dataclass(frozen=True)
class Offers:
    targeted: tuple[str, ...]  # 'offered' rows, one per matched mechanic
    broadcast: str  # the 'queued' row any mechanic may accept


async def offer_session(conn: psycopg.AsyncConnection, session_id: str,
                        matched_mechanic_ids: list[str]) -> Offers:
    """The assignments checkout creates right after the session
    (src/lib/sessionFactory.ts): an 'offered' row for each of the top three
    matches, stamped offered_at but never expires_at, then one broadcast
    'queued' row without a mechanic."""
    targeted = []
    for mechanic_id in matched_mechanic_ids[:3]:
        targeted.append(await _key(
            conn, "insert into public.session_assignments "
                  "(session_id, mechanic_id, status, offered_at, metadata) "
                  "values (%s, %s, 'offered', now(), %s) returning id",
            (session_id, mechanic_id, Jsonb({"match_type": "targeted"}))))
    broadcast = await _key(
        conn, "insert into public.session_assignments (session_id, status, metadata) "
              "values (%s, 'queued', %s) returning id",
        (session_id, Jsonb({"match_type": "broadcast"})))
    return Offers(tuple(targeted), broadcast)


async def accept_session(conn: psycopg.AsyncConnection, session_id: str, mechanic_id: str) -> None:
    """A mechanic accepts (src/app/api/mechanic/assignments/[id]/accept/route.ts):
    the queued assignment becomes 'accepted' with accepted_at and the mechanic;
    the session gets mechanic_id, and moves pending -> waiting only when it was
    pending (a scheduled session stays 'scheduled', a signed one 'waiting')."""
    await conn.execute(
        "update public.session_assignments set status = 'accepted', accepted_at = now(), "
        "mechanic_id = %s where id = (select id from public.session_assignments "
        "where session_id = %s and status = 'queued' order by created_at limit 1)",
        (mechanic_id, session_id))
    await conn.execute(
        "update public.sessions set mechanic_id = %s, "
        "status = case when status = 'pending' then 'waiting' else status end where id = %s",
        (mechanic_id, session_id))


async def start_session(conn: psycopg.AsyncConnection, session_id: str) -> bool:
    """Both participants are in (src/app/api/sessions/[id]/start/route.ts):
    'live' and started_at, compare-and-set on the status read before. It sets
    neither expires_at nor duration_minutes. Returns whether this call won."""
    row = await _one(conn, "select status from public.sessions where id = %s", (session_id,))
    if row is None or row["status"] not in ("waiting", "scheduled", "pending"):
        return False
    cur = await conn.execute(
        "update public.sessions set status = 'live', started_at = now(), updated_at = now() "
        "where id = %s and status = %s", (session_id, row["status"]))
    return cur.rowcount == 1


async def extend_session(conn: psycopg.AsyncConnection, session_id: str, minutes: int,
                         payment_intent_id: str, *, extension_row: bool = True) -> None:
    """A paid extension (src/app/api/stripe/webhook/route.ts, payment_intent.succeeded
    with metadata.mode 'extension'): one session_extensions row, idempotent on
    payment_intent_id; then duration_minutes += minutes, and expires_at moved:
    max(expires_at, now) + minutes when set, else started_at + the new
    duration_minutes (which started at 0, so earlier than the plan's end),
    else left null.

    `extension_row=False` is the app at its HEAD, whose `.upsert().onConflict()`
    throws before writing: no extension row, the session update still runs."""
    if extension_row:
        await conn.execute(
            "insert into public.session_extensions (session_id, minutes, payment_intent_id, "
            "created_at) values (%s, %s, %s, now()) on conflict (payment_intent_id) do nothing",
            (session_id, minutes, payment_intent_id))
    await conn.execute(
        "update public.sessions set "
        "duration_minutes = coalesce(duration_minutes, 0) + %(m)s, "
        "expires_at = case "
        "  when expires_at is not null "
        "       then greatest(expires_at, now()) + make_interval(mins => %(m)s) "
        "  when started_at is not null then started_at "
        "       + make_interval(mins => coalesce(duration_minutes, 0) + %(m)s) "
        "  else null end, "
        "updated_at = now() where id = %(id)s",
        {"m": minutes, "id": session_id})


async def end_session(conn: psycopg.AsyncConnection, session_id: str) -> bool:
    """A participant ends the session (src/app/api/sessions/[id]/end/route.ts):
    'completed' and ended_at, from waiting or live only. The route then sets
    the session's assignments to 'ended', which their CHECK rejects; the app
    only logs the error, so the assignments keep their status. Returns whether
    the session was ended."""
    cur = await conn.execute(
        "update public.sessions set status = 'completed', ended_at = now() "
        "where id = %s and status in ('waiting', 'live')", (session_id,))
    try:
        async with conn.transaction():
            await conn.execute(
                "update public.session_assignments set status = 'ended', updated_at = now() "
                "where session_id = %s", (session_id,))
    except psycopg.errors.CheckViolation:
        pass  # as the app: logged there, nothing changed
    return cur.rowcount == 1


async def sign_waiver(conn: psycopg.AsyncConnection, session_id: str, signature: str) -> bool:
    """The customer signs a scheduled session's waiver
    (src/app/api/sessions/[id]/sign-waiver/route.ts): only from 'scheduled'
    and only once; status becomes 'waiting' while scheduled_for is still
    ahead."""
    cur = await conn.execute(
        "update public.sessions set waiver_signed_at = now(), waiver_signature = %s, "
        "status = 'waiting' where id = %s and status = 'scheduled' and waiver_signed_at is null",
        (signature.strip(), session_id))
    return cur.rowcount == 1


async def record_no_show_compensation(conn: psycopg.AsyncConnection, session_id: str,
                                      paid_amount: float, mechanic_share: float) -> None:
    """The money rows of the no-show job (src/lib/scheduledSessionChecker.ts):
    a pending_payout earning for the mechanic's user and an 'available'
    credit for the customer, expiring in 90 days. (The job also writes status
    'cancelled_no_show', which the sessions CHECK rejects; it ignores that
    error and writes these rows again on its next run.)"""
    row = await _one(conn, "select s.customer_user_id, m.user_id as mechanic_user_id "
                           "from public.sessions s left join public.mechanics m "
                           "on m.id = s.mechanic_id where s.id = %s", (session_id,))
    assert row is not None
    if row["mechanic_user_id"] is not None:
        await conn.execute(
            "insert into public.mechanic_earnings (mechanic_user_id, session_id, amount, type, "
            "status) values (%s, %s, %s, 'no_show_compensation', 'pending_payout')",
            (row["mechanic_user_id"], session_id, mechanic_share))
    await conn.execute(
        "insert into public.customer_credits (customer_user_id, session_id, amount, type, status, "
        "expires_at) values (%s, %s, %s, 'no_show_credit', 'available', "
        "now() + interval '90 days')",
        (row["customer_user_id"], session_id, paid_amount - mechanic_share))


# -- scheduling and waitlist -------------------------------------------------------------

async def reserve_slot(conn: psycopg.AsyncConnection, mechanic_user_id: str,
                       start_time: datetime, end_time: datetime, hold_minutes: int = 15) -> str:
    """A checkout hold on a mechanic's slot
    (src/lib/scheduling/reservationService.ts, createReservation): 'reserved'
    for 15 minutes, no session yet; mechanic_id is the mechanic's profile."""
    return await _key(
        conn, "insert into public.slot_reservations (mechanic_id, start_time, end_time, status, "
              "expires_at) values (%s, %s, %s, 'reserved', now() + make_interval(mins => %s)) "
              "returning id", (mechanic_user_id, start_time, end_time, hold_minutes))


async def confirm_reservation(conn: psycopg.AsyncConnection, reservation_id: str,
                              session_id: str) -> None:
    """Payment done (reservationService.ts, confirmReservation): 'confirmed'
    with the session; the app's trigger stamps confirmed_at and clears
    expires_at."""
    await conn.execute(
        "update public.slot_reservations set status = 'confirmed', session_id = %s "
        "where id = %s and status = 'reserved'", (session_id, reservation_id))


async def join_waitlist(conn: psycopg.AsyncConnection, customer_id: str, email: str,
                        name: str | None) -> str:
    """"Tell me when a mechanic is online" (src/app/api/customer/waitlist/join/route.ts):
    'pending', expires_at by the column default (24 hours)."""
    return await _key(
        conn, "insert into public.customer_waitlist (customer_id, notification_type, status, "
              "metadata) values (%s, 'mechanic_online', 'pending', %s) returning id",
        (customer_id, Jsonb({"email": email, "name": name})))


# -- session invites ---------------------------------------------------------------------

async def create_session_invite(conn: psycopg.AsyncConnection, session_id: str, role: str,
                                created_by: str) -> tuple[str, str]:
    """A one-time join code (src/app/api/session/invite/create/route.ts):
    uppercase letters and digits, 'pending', expiring 24 hours later.
    Returns (id, code)."""
    code = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(8))
    invite_id = await _key(
        conn, "insert into public.session_invites (code, session_id, role, expires_at, "
              "created_by, status) values (%s, %s, %s, now() + interval '24 hours', %s, 'pending') "
              "returning id", (code, session_id, role, created_by))
    return invite_id, code


async def redeem_session_invite(conn: psycopg.AsyncConnection, code: str, user_id: str) -> bool:
    """src/app/api/session/invite/redeem/route.ts: 'consumed' with who and
    when, only while pending and unexpired."""
    cur = await conn.execute(
        "update public.session_invites set status = 'consumed', redeemed_by = %s, "
        "redeemed_at = now() where code = %s and status = 'pending' and expires_at > now()",
        (user_id, code))
    return cur.rowcount == 1


# -- workshops ---------------------------------------------------------------------------

async def create_workshop(conn: psycopg.AsyncConnection, name: str, email: str,
                          created_by: str) -> str:
    """A workshop application (the organizations row the workshop signup
    creates): 'pending' until an admin approves it."""
    slug = f"{name.lower().replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
    return await _key(
        conn, "insert into public.organizations (organization_type, name, slug, email, status, "
              "created_by) values ('workshop', %s, %s, %s, 'pending', %s) returning id",
        (name, slug, email, created_by))


async def invite_mechanic(conn: psycopg.AsyncConnection, organization_id: str, invite_email: str,
                          invited_by: str, role: str = "member") -> str:
    """A workshop invites a mechanic by email
    (src/app/api/workshop/invite-mechanic/route.ts): a 'pending' membership
    without a user, expiring 7 days later."""
    return await _key(
        conn, "insert into public.organization_members (organization_id, invite_email, role, "
              "status, invited_by, invite_expires_at) values (%s, %s, %s, 'pending', %s, "
              "now() + interval '7 days') returning id",
        (organization_id, invite_email, role, invited_by))


async def create_rfq(conn: psycopg.AsyncConnection, customer_id: str, mechanic_id: str,
                     title: str, bid_deadline_hours: int = 72) -> str:
    """An RFQ open for bids, as the mechanic's draft
    (src/app/api/mechanic/rfq/create-draft/route.ts) leaves it once the
    customer approves it (src/app/api/customer/rfq/drafts/[draftId]/approve/route.ts):
    a completed diagnostic session, its escalation row, and the RFQ 'open'
    until bid_deadline. The app writes the escalation as 'draft' then
    'posted', which its CHECK rejects; here it is 'pending', the status the
    app's RFQ trigger gives an open RFQ's escalation."""
    diagnostic_id = await _key(
        conn, "insert into public.diagnostic_sessions (customer_id, mechanic_id, session_type, "
              "base_price, total_price, status, started_at, ended_at, completed_at) values "
              "(%s, %s, 'video', 39, 39, 'completed', now() - interval '1 hour', now(), now()) "
              "returning id", (customer_id, mechanic_id))
    escalation_id = await _key(
        conn, "insert into public.workshop_escalation_queue (diagnostic_session_id, customer_id, "
              "escalating_mechanic_id, status, escalation_type, rfq_posted_at, rfq_bid_deadline) "
              "values (%s, %s, %s, 'pending', 'rfq_marketplace', now(), "
              "now() + make_interval(hours => %s)) returning id",
        (diagnostic_id, customer_id, mechanic_id, bid_deadline_hours))
    rfq_id = await _key(
        conn, "insert into public.workshop_rfq_marketplace (escalation_queue_id, customer_id, "
              "diagnostic_session_id, escalating_mechanic_id, title, description, "
              "diagnosis_summary, bid_deadline, status, customer_consent_to_share_info) values "
              "(%s, %s, %s, %s, %s, %s, %s, now() + make_interval(hours => %s), 'open', true) "
              "returning id",
        (escalation_id, customer_id, diagnostic_id, mechanic_id, title, title,
         "diagnosed remotely", bid_deadline_hours))
    await conn.execute("update public.workshop_escalation_queue set rfq_marketplace_id = %s "
                       "where id = %s", (rfq_id, escalation_id))
    return rfq_id


# -- accounts ----------------------------------------------------------------------------

async def suspend_user(conn: psycopg.AsyncConnection, user_id: str, duration_days: int) -> None:
    """An admin suspends a user (src/app/api/admin/users/[id]/suspend/route.ts):
    profiles 'suspended' until now + duration_days, and the same on
    `mechanics` matched by id = the USER id, as the route does (so a
    mechanic, whose mechanics.id differs, is not suspended there)."""
    await conn.execute(
        "update public.profiles set account_status = 'suspended', "
        "suspended_until = now() + make_interval(days => %s) where id = %s",
        (duration_days, user_id))
    await conn.execute(
        "update public.mechanics set account_status = 'suspended', "
        "suspended_until = (now() + make_interval(days => %s)) at time zone 'UTC' where id = %s",
        (duration_days, user_id))


async def start_cooling_period(conn: psycopg.AsyncConnection, mechanic_id: str) -> None:
    """A mechanic leaves a workshop: the app's trigger on mechanics
    (supabase/migrations/20251109000002_add_cooling_period.sql) suspends the
    account for 30 days, suspended_until as UTC wall time (no time zone)."""
    await conn.execute(
        "update public.mechanics set workshop_id = null, account_type = 'individual_mechanic', "
        "account_status = 'suspended', "
        "suspended_until = (now() + interval '30 days') at time zone 'UTC', "
        "ban_reason = 'Cooling period after workshop termination. You can resume work in 30 days.' "
        "where id = %s", (mechanic_id,))
