-- Reference stand-in of the app's REAL schema (The Auto Doctor, repository
-- faizrhashmi/theautodoctor at 2fc7966), for the embedded database, tests and
-- local development ONLY. `listener migrate` applies it only when asked
-- (--reference), after reference/0001, and again on every such run: every
-- statement here must be safe to repeat on a database that already has it,
-- and on one the listener's own migrations have since changed.
--
-- Written from the app's migrations (each table names its file); the app's
-- baseline dump (supabase/migrations/20251108020831_remote_schema.sql) is
-- empty, so where two migrations disagree the comment says which one is
-- followed. Row-level security policies, grants and most indexes are left out:
-- the listener connects as the table owner or the service role. Foreign keys
-- to tables outside this stand-in (intakes, vehicles, payments, ...) are left
-- out too. Deliberate departures from the app are marked "stand-in:".

-- gen_random_uuid() is built in (PostgreSQL 13+); the invite codes the app
-- draws from pgcrypto come from it too, so the embedded server (which ships no
-- pgcrypto) can hold this schema.

-- ---------------------------------------------------------------------------
-- auth.users: Supabase Auth. The listener reads id and email.
alter table auth.users add column if not exists created_at timestamptz not null default now();

-- ---------------------------------------------------------------------------
-- public.profiles: one row per auth user. Columns from the app's schema audit
-- (SCHEMA_AUDIT_RESULTS.json); account_status, suspended_until and ban_reason
-- from supabase/migrations_backup/admin-users-phase1/01_up.sql.
alter table public.profiles
    add column if not exists email text,
    add column if not exists role text,
    add column if not exists phone text,
    add column if not exists created_at timestamptz not null default now(),
    add column if not exists updated_at timestamptz not null default now(),
    add column if not exists account_status text default 'active'
        check (account_status in ('active', 'suspended', 'banned', 'deleted')),
    add column if not exists suspended_until timestamptz,
    add column if not exists ban_reason text,
    add column if not exists stripe_payouts_enabled boolean default false,
    add column if not exists organization_id uuid,
    add column if not exists metadata jsonb default '{}'::jsonb;

-- ---------------------------------------------------------------------------
-- public.mechanics: columns from SCHEMA_AUDIT_RESULTS.json; account_status,
-- suspended_until and ban_reason from
-- supabase/migrations/20251109000001_1_add_suspension_fields.sql (whose CHECK
-- allows 'pending' where the older admin migration allowed 'deleted': the
-- newer file is followed). suspended_until is `timestamp WITHOUT time zone`
-- in the app: the cooling-period trigger
-- (supabase/migrations/20251109000002_add_cooling_period.sql) writes
-- (now() + 30 days)::timestamp, i.e. UTC wall time on Supabase. last_seen_at
-- from supabase/migrations/20251109040100_add_last_seen_at_column.sql;
-- currently_on_shift from
-- supabase/migrations_backup/20251028000001_add_micro_sessions_and_onshift_tracking.sql.
alter table public.mechanics
    add column if not exists created_at timestamptz default now(),
    add column if not exists phone text,
    add column if not exists account_status text default 'active'
        check (account_status in ('active', 'suspended', 'banned', 'pending')),
    add column if not exists suspended_until timestamp without time zone,
    add column if not exists ban_reason text,
    add column if not exists workshop_id uuid,
    add column if not exists account_type text,
    add column if not exists is_available boolean default false,
    add column if not exists currently_on_shift boolean default false,
    add column if not exists last_seen_at timestamptz,
    add column if not exists stripe_account_id text,
    add column if not exists stripe_payouts_enabled boolean default false;

-- ---------------------------------------------------------------------------
-- public.sessions: supabase/2025-10-19_sessions_chat.sql (type enum, plan,
-- stripe_session_id, intake_id, metadata), the 27 columns of
-- SCHEMA_AUDIT_RESULTS.json, migrations/06_session_extensions_and_files.sql
-- (expires_at, duration_minutes default 0),
-- supabase/migrations/20251110000002_add_reminder_columns.sql (reminder flags),
-- supabase/migrations/20251110000004_phase7_waiver_system.sql (waiver_*,
-- cancelled_at, cancellation_reason).
--
-- No migration adds mechanic_user_id (create-scheduled and the reminder code
-- write it anyway), payment_status or payment_method: they are left out, as
-- a database built from the app's migrations lacks them.
--
-- stand-in: plan and stripe_session_id are NOT NULL in the app; here they are
-- nullable, and type keeps a default, so the listener's own tests can insert
-- bare sessions (a null plan is also a case the plan-end rule must handle).
do $$
begin
    if not exists (select 1 from pg_type t join pg_namespace n on n.oid = t.typnamespace
                   where n.nspname = 'public' and t.typname = 'session_type') then
        create type public.session_type as enum ('chat', 'video', 'diagnostic');
    end if;
    if (select data_type from information_schema.columns
         where table_schema = 'public' and table_name = 'sessions' and column_name = 'type')
       <> 'USER-DEFINED' then
        alter table public.sessions alter column type drop default;
        alter table public.sessions
            alter column type type public.session_type using type::public.session_type;
        alter table public.sessions alter column type set default 'video';
    end if;
end $$;

alter table public.sessions
    add column if not exists plan text,
    add column if not exists stripe_session_id text unique,
    add column if not exists customer_email text,
    add column if not exists intake_id uuid,
    add column if not exists scheduled_start timestamptz,
    add column if not exists scheduled_end timestamptz,
    add column if not exists duration_minutes integer default 0,
    add column if not exists summary_data jsonb,
    add column if not exists parent_session_id uuid,
    add column if not exists is_follow_up boolean default false,
    add column if not exists workshop_id uuid,
    add column if not exists preferred_workshop_id uuid,
    add column if not exists reminder_24h_sent boolean default false,
    add column if not exists reminder_1h_sent boolean default false,
    add column if not exists reminder_15min_sent boolean default false,
    add column if not exists waiver_signed_at timestamptz,
    add column if not exists waiver_signature text,
    add column if not exists waiver_reminder_sent_at timestamptz,
    add column if not exists cancellation_reason text;

-- The status CHECK. Two variants exist and which one is live is unknown:
-- migrations/02_db_constraints.sql allows pending, scheduled, waiting, live,
-- completed, cancelled, expired, refunded, archived;
-- supabase/migrations_backup/99990009_phase2_fix_type_mismatches.sql allows
-- pending, waiting, live, scheduled, completed, cancelled, expired, unattended.
-- This is their union. Neither allows accepted, reconnecting, in_progress or
-- cancelled_no_show, so neither does this: a rule may write only a status in
-- both variants (completed, cancelled, expired).
do $$
begin
    if not exists (select 1 from pg_constraint
                   where conname = 'sessions_status_check'
                     and conrelid = 'public.sessions'::regclass) then
        alter table public.sessions add constraint sessions_status_check check (status in (
            'pending', 'scheduled', 'waiting', 'live', 'completed', 'cancelled',
            'expired', 'refunded', 'archived', 'unattended'));
    end if;
end $$;
-- Left out: the app's partial unique indexes uniq_mech_one_active
-- (migrations/02_db_constraints.sql) and uq_active_session_per_customer
-- (supabase/migrations_backup/20251105000001_active_session_unique_index.sql),
-- which stop a mechanic or a customer from having two open sessions; test
-- fixtures reuse one customer and one mechanic across many sessions.

-- ---------------------------------------------------------------------------
-- public.session_extensions: migrations/06_session_extensions_and_files.sql.
-- One row per paid extension; payment_intent_id unique makes the webhook
-- idempotent.
create table if not exists public.session_extensions (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.sessions (id) on delete cascade,
    minutes integer not null check (minutes > 0),
    payment_intent_id text unique,
    created_at timestamptz default now(),
    metadata jsonb default '{}'::jsonb
);
create index if not exists idx_session_extensions_session_id
    on public.session_extensions (session_id);

-- ---------------------------------------------------------------------------
-- public.session_logs: migrations/05_observability_and_compliance.sql. The
-- admin session timeline reads it. level accepts 'warn', not 'warning'.
create table if not exists public.session_logs (
    id uuid primary key default gen_random_uuid(),
    level text not null check (level in ('info', 'warn', 'error', 'debug')),
    event text not null,
    message text not null,
    session_id uuid references public.sessions (id) on delete cascade,
    mechanic_id uuid,
    customer_id uuid,
    request_id uuid,
    metadata jsonb default '{}'::jsonb,
    created_at timestamptz not null default now()
);
create index if not exists idx_session_logs_session_id
    on public.session_logs (session_id, created_at desc);

-- ---------------------------------------------------------------------------
-- public.session_assignments: who may take a session.
-- supabase/migrations_backup/20251104000001_session_unification.sql (table),
-- supabase/migrations_backup/20251106000010_add_pending_waiver_status.sql
-- (the status CHECK, which has no 'ended' although /api/sessions/[id]/end
-- writes it), supabase/migrations/20251110000003_add_matching_fields.sql
-- (match_score, match_reasons, priority, expires_at).
create table if not exists public.session_assignments (
    id uuid primary key default gen_random_uuid(),
    session_id uuid not null references public.sessions (id) on delete cascade,
    mechanic_id uuid references public.mechanics (id) on delete set null,
    status text not null default 'queued',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    offered_at timestamptz,
    accepted_at timestamptz,
    expired_at timestamptz,
    metadata jsonb not null default '{}'::jsonb,
    match_score integer default 0,
    match_reasons text[] default '{}',
    priority varchar(20) default 'normal' check (priority in ('high', 'normal', 'low')),
    expires_at timestamptz,
    constraint session_assignments_status_check check (status in (
        'pending_waiver', 'queued', 'offered', 'accepted', 'declined', 'expired',
        'cancelled', 'completed'))
);
create index if not exists idx_session_assignments_session
    on public.session_assignments (session_id);

-- ---------------------------------------------------------------------------
-- public.slot_reservations: supabase/migrations/20251110000001_create_slot_reservations.sql.
-- mechanic_id references profiles (the mechanic's auth user), not mechanics.
-- The app's trigger stamps confirmed_at and clears expires_at on confirm;
-- reference_slot_reservation_touch below does the same.
create table if not exists public.slot_reservations (
    id uuid primary key default gen_random_uuid(),
    session_id uuid unique references public.sessions (id) on delete cascade,
    mechanic_id uuid not null references public.profiles (id) on delete cascade,
    start_time timestamptz not null,
    end_time timestamptz not null,
    status varchar(50) not null default 'reserved',
    expires_at timestamptz,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    reserved_at timestamptz default now(),
    confirmed_at timestamptz,
    metadata jsonb default '{}'::jsonb,
    constraint valid_time_range check (end_time > start_time),
    constraint valid_status check (status in ('reserved', 'confirmed', 'expired', 'cancelled'))
);
create index if not exists idx_slot_reservations_expires_at
    on public.slot_reservations (expires_at) where status = 'reserved' and expires_at is not null;

create or replace function public.reference_slot_reservation_touch()
returns trigger language plpgsql as $$
begin
    new.updated_at := now();
    if new.status = 'confirmed' and old.status is distinct from 'confirmed' then
        new.confirmed_at := now();
        new.expires_at := null;
    end if;
    return new;
end $$;
drop trigger if exists reference_slot_reservation_touch on public.slot_reservations;
create trigger reference_slot_reservation_touch
    before update on public.slot_reservations
    for each row execute function public.reference_slot_reservation_touch();

-- The app forbids overlapping live holds of one mechanic with an exclusion
-- constraint (btree_gist); added where the extension is available.
do $$
begin
    if exists (select 1 from pg_available_extensions where name = 'btree_gist') then
        create extension if not exists btree_gist;
        if not exists (select 1 from pg_constraint
                       where conname = 'no_overlapping_reservations'
                         and conrelid = 'public.slot_reservations'::regclass) then
            execute 'alter table public.slot_reservations
                add constraint no_overlapping_reservations exclude using gist (
                    mechanic_id with =, tstzrange(start_time, end_time) with &&)
                where (status in (''reserved'', ''confirmed''))';
        end if;
    end if;
end $$;

-- ---------------------------------------------------------------------------
-- public.customer_waitlist: supabase/migrations/20251111110444_create_customer_waitlist.sql.
-- No status CHECK: the values (pending, notified, expired, cancelled) are a
-- comment only.
create table if not exists public.customer_waitlist (
    id uuid primary key default gen_random_uuid(),
    customer_id uuid not null references auth.users (id) on delete cascade,
    notification_type varchar(50) not null default 'mechanic_online',
    status varchar(20) not null default 'pending',
    metadata jsonb default '{}'::jsonb,
    created_at timestamptz not null default now(),
    notified_at timestamptz,
    expires_at timestamptz not null default (now() + interval '24 hours')
);

-- ---------------------------------------------------------------------------
-- public.customer_credits and public.mechanic_earnings:
-- supabase/migrations/20251110000004_phase7_waiver_system.sql. No status
-- CHECK on either (available/used/expired and pending_payout/paid/cancelled
-- are comments). The no-show job is the only writer of both.
create table if not exists public.customer_credits (
    id uuid primary key default gen_random_uuid(),
    customer_user_id uuid not null references auth.users (id) on delete cascade,
    session_id uuid references public.sessions (id) on delete set null,
    amount numeric(10, 2) not null,
    type varchar(50) not null,
    status varchar(50) not null default 'available',
    used_at timestamptz,
    used_for_session_id uuid references public.sessions (id) on delete set null,
    expires_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table if not exists public.mechanic_earnings (
    id uuid primary key default gen_random_uuid(),
    mechanic_user_id uuid not null references auth.users (id) on delete cascade,
    session_id uuid references public.sessions (id) on delete set null,
    amount numeric(10, 2) not null,
    type varchar(50) not null,
    status varchar(50) not null default 'pending_payout',
    payout_date timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- ---------------------------------------------------------------------------
-- public.organizations: supabase/migrations_backup/20250124000001_create_organizations.sql
-- (workshops and corporate accounts).
create table if not exists public.organizations (
    id uuid primary key default gen_random_uuid(),
    organization_type text not null check (organization_type in ('corporate', 'workshop')),
    name text not null,
    slug text unique not null,
    email text not null,
    phone text,
    city text,
    province text,
    status text default 'pending' check (status in ('pending', 'active', 'suspended', 'closed')),
    verification_status text default 'unverified'
        check (verification_status in ('unverified', 'pending', 'verified', 'rejected')),
    settings jsonb default '{}'::jsonb,
    metadata jsonb default '{}'::jsonb,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    created_by uuid references auth.users (id),
    approved_by uuid references auth.users (id),
    approved_at timestamptz
);

-- public.organization_members: memberships and the workshop's mechanic
-- invitations. supabase/migrations_backup/20250124000002_create_organization_members.sql,
-- status CHECK restated by supabase/migrations_backup/99990009_phase2_fix_type_mismatches.sql.
-- The row CHECK ties status to user_id: a pending invitation has no user, and
-- every other status needs one, so a pending invitation has NO status it can
-- expire to ('expired' is not allowed at all).
create table if not exists public.organization_members (
    id uuid primary key default gen_random_uuid(),
    organization_id uuid not null references public.organizations (id) on delete cascade,
    user_id uuid references auth.users (id) on delete cascade,
    role text not null check (role in ('owner', 'admin', 'member', 'viewer')),
    permissions jsonb default '{}'::jsonb,
    status text default 'pending',
    invite_code text unique default replace(gen_random_uuid()::text, '-', ''),
    invite_email text,
    invited_by uuid references auth.users (id),
    invited_at timestamptz default now(),
    invite_expires_at timestamptz default (now() + interval '7 days'),
    joined_at timestamptz,
    notes text,
    metadata jsonb default '{}'::jsonb,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    unique (organization_id, user_id),
    constraint organization_members_status_check
        check (status in ('pending', 'active', 'suspended', 'removed')),
    constraint organization_members_user_for_status check (
        (status = 'pending' and user_id is null)
        or (status in ('active', 'suspended', 'removed') and user_id is not null))
);

-- ---------------------------------------------------------------------------
-- public.diagnostic_sessions: supabase/migrations_backup/20250127000001_add_repair_quote_system.sql,
-- credit columns from supabase/migrations/20251112000008_diagnostic_credit_system.sql.
-- (The app also writes statuses 'accepted' and 'customer_rfq_created', which
-- this CHECK rejects.)
create table if not exists public.diagnostic_sessions (
    id uuid primary key default gen_random_uuid(),
    customer_id uuid references public.profiles (id) on delete cascade,
    mechanic_id uuid references public.mechanics (id) on delete set null,
    workshop_id uuid references public.organizations (id) on delete set null,
    session_type text not null
        check (session_type in ('chat', 'video', 'upgraded_from_chat', 'mobile_visit')),
    base_price numeric(10, 2) not null,
    total_price numeric(10, 2) not null,
    status text default 'scheduled'
        check (status in ('scheduled', 'in_progress', 'completed', 'cancelled')),
    scheduled_at timestamptz,
    started_at timestamptz,
    ended_at timestamptz,
    completed_at timestamptz,
    diagnosis_summary text,
    requires_in_person_follow_up boolean default false,
    diagnostic_credit_used boolean default false,
    diagnostic_credit_expires_at timestamptz,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);

-- public.repair_quotes: supabase/migrations_backup/20250127000001_add_repair_quote_system.sql;
-- quote_valid_until (a DATE) from
-- supabase/migrations_backup/20251207000001_quote_enforcement_ocpa_compliance.sql.
-- The status CHECK has no 'expired': an offer past its 7 days stays pending.
create table if not exists public.repair_quotes (
    id uuid primary key default gen_random_uuid(),
    customer_id uuid references public.profiles (id) on delete cascade,
    diagnostic_session_id uuid references public.diagnostic_sessions (id) on delete set null,
    workshop_id uuid references public.organizations (id) on delete set null,
    mechanic_id uuid references public.mechanics (id) on delete set null,
    line_items jsonb not null default '[]'::jsonb,
    labor_cost numeric(10, 2) not null default 0,
    parts_cost numeric(10, 2) not null default 0,
    subtotal numeric(10, 2) not null,
    platform_fee_percent numeric(5, 2) not null,
    platform_fee_amount numeric(10, 2) not null,
    customer_total numeric(10, 2) not null,
    provider_receives numeric(10, 2) not null,
    status text default 'pending' check (status in (
        'pending', 'viewed', 'approved', 'declined', 'modified', 'in_progress',
        'completed', 'cancelled')),
    created_at timestamptz default now(),
    sent_at timestamptz,
    viewed_at timestamptz,
    customer_responded_at timestamptz,
    quote_valid_until date,
    updated_at timestamptz default now()
);

-- public.workshop_escalation_queue: supabase/migrations_backup/20251027000001_add_workshop_escalation.sql.
create table if not exists public.workshop_escalation_queue (
    id uuid primary key default gen_random_uuid(),
    diagnostic_session_id uuid not null references public.diagnostic_sessions (id) on delete cascade,
    customer_id uuid not null references public.profiles (id) on delete cascade,
    escalating_mechanic_id uuid not null references public.mechanics (id) on delete set null,
    assigned_workshop_id uuid references public.organizations (id) on delete cascade,
    status text default 'pending' check (status in (
        'pending', 'accepted', 'in_progress', 'quote_sent', 'declined', 'cancelled')),
    priority text default 'normal' check (priority in ('low', 'normal', 'high', 'urgent')),
    assigned_at timestamptz,
    accepted_at timestamptz,
    quote_created_at timestamptz,
    quote_id uuid references public.repair_quotes (id),
    declined_reason text,
    declined_at timestamptz,
    -- added by the RFQ migration (20251206000002_phase6_workshop_rfq_marketplace.sql);
    -- the app's RFQ routes also write status 'draft' and 'posted' and a column
    -- columns escalation_status and metadata, which neither the CHECK nor any
    -- migration has.
    escalation_type text default 'direct_assignment'
        check (escalation_type in ('direct_assignment', 'rfq_marketplace')),
    rfq_marketplace_id uuid,
    rfq_posted_at timestamptz,
    rfq_bid_deadline timestamptz,
    rfq_bid_count integer default 0,
    winning_workshop_id uuid references public.organizations (id),
    customer_selected_bid_at timestamptz,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);

-- public.workshop_rfq_marketplace and public.workshop_rfq_bids:
-- supabase/migrations_backup/20251206000002_phase6_workshop_rfq_marketplace.sql,
-- completed by supabase/migrations/20251112000001_complete_rfq_marketplace_setup.sql
-- (indexes, the sync trigger, auto_expire_rfq_marketplace()). No column
-- records that the 24-hour warning was sent.
create table if not exists public.workshop_rfq_marketplace (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    escalation_queue_id uuid not null unique
        references public.workshop_escalation_queue (id) on delete cascade,
    customer_id uuid not null references public.profiles (id) on delete cascade,
    diagnostic_session_id uuid not null references public.diagnostic_sessions (id) on delete cascade,
    escalating_mechanic_id uuid references public.mechanics (id) on delete set null,
    title text not null,
    description text not null,
    urgency text default 'normal' check (urgency in ('low', 'normal', 'high', 'urgent')),
    diagnosis_summary text not null,
    bid_deadline timestamptz not null,
    max_bids integer default 10,
    auto_expire_hours integer default 72,
    status text default 'open' check (status in (
        'draft', 'open', 'under_review', 'bid_accepted', 'quote_sent', 'converted',
        'expired', 'cancelled')),
    bid_count integer default 0,
    accepted_bid_id uuid,
    accepted_at timestamptz,
    customer_consent_to_share_info boolean not null default false,
    referral_fee_disclosed boolean not null default false,
    metadata jsonb default '{}'
);
create index if not exists idx_rfq_marketplace_deadline
    on public.workshop_rfq_marketplace (bid_deadline) where status = 'open';

create table if not exists public.workshop_rfq_bids (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    rfq_marketplace_id uuid not null references public.workshop_rfq_marketplace (id) on delete cascade,
    workshop_id uuid not null references public.organizations (id) on delete cascade,
    workshop_name text not null,
    quote_amount numeric(10, 2) not null,
    parts_cost numeric(10, 2),
    labor_cost numeric(10, 2),
    description text not null,
    status text default 'pending'
        check (status in ('pending', 'accepted', 'rejected', 'withdrawn', 'expired')),
    accepted_at timestamptz,
    rejected_at timestamptz,
    withdrawn_at timestamptz,
    metadata jsonb default '{}',
    unique (rfq_marketplace_id, workshop_id),
    constraint quote_breakdown_required check (parts_cost is not null and labor_cost is not null)
);

-- The app keeps the escalation row in step with its RFQ (an expired RFQ
-- declines the escalation). Our own trigger with the same mapping; the app's
-- version also copies accepted_bid_id into winning_workshop_id, a bid id into
-- a workshop column, which is left out.
create or replace function public.reference_rfq_sync_escalation()
returns trigger language plpgsql as $$
begin
    if new.status is distinct from old.status then
        update public.workshop_escalation_queue e
           set status = case new.status
                   when 'open' then 'pending'
                   when 'under_review' then 'pending'
                   when 'bid_accepted' then 'accepted'
                   when 'quote_sent' then 'quote_sent'
                   when 'converted' then 'quote_sent'
                   when 'expired' then 'declined'
                   when 'cancelled' then 'cancelled'
                   else e.status end,
               updated_at = now()
         where e.rfq_marketplace_id = new.id;
    end if;
    return new;
end $$;
drop trigger if exists reference_rfq_sync_escalation on public.workshop_rfq_marketplace;
create trigger reference_rfq_sync_escalation
    after update on public.workshop_rfq_marketplace
    for each row execute function public.reference_rfq_sync_escalation();

-- ---------------------------------------------------------------------------
-- public.session_invites: one-time codes to join a session.
-- supabase/migrations_backup/batch-5-security/01_up.sql (status is the enum
-- invite_status; the unused expire_old_invite_codes() sets 'expired').
do $$
begin
    if not exists (select 1 from pg_type t join pg_namespace n on n.oid = t.typnamespace
                   where n.nspname = 'public' and t.typname = 'invite_status') then
        create type public.invite_status as enum ('pending', 'consumed', 'expired', 'revoked');
    end if;
end $$;
create table if not exists public.session_invites (
    id uuid primary key default gen_random_uuid(),
    code text not null unique,
    session_id uuid not null references public.sessions (id) on delete cascade,
    role text not null check (role in ('customer', 'mechanic')),
    status public.invite_status not null default 'pending',
    created_by uuid not null,
    created_at timestamptz not null default now(),
    expires_at timestamptz not null,
    redeemed_by uuid,
    redeemed_at timestamptz,
    constraint valid_invite_code check (code ~ '^[A-Z0-9]+$'),
    constraint redeemed_fields_consistent check (
        (status = 'consumed' and redeemed_by is not null and redeemed_at is not null)
        or (status <> 'consumed' and redeemed_by is null and redeemed_at is null))
);

-- ---------------------------------------------------------------------------
-- Money. The listener only tells the app (webhooks); these tables are here so
-- those rules have rows to watch.
--
-- public.service_plans: supabase/migrations_backup/20251027000000_create_service_plans_table.sql
-- (columns the subscription rows need).
create table if not exists public.service_plans (
    id uuid primary key default gen_random_uuid(),
    slug text not null unique,
    name text not null,
    price numeric(10, 2) not null default 0,
    duration_minutes integer not null,
    description text not null default '',
    is_active boolean not null default true,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

-- public.customer_subscriptions: supabase/migrations_backup/20251202000001_phase3_subscription_system.sql.
create table if not exists public.customer_subscriptions (
    id uuid primary key default gen_random_uuid(),
    customer_id uuid not null references public.profiles (id) on delete cascade,
    plan_id uuid not null references public.service_plans (id),
    stripe_subscription_id text unique,
    stripe_customer_id text,
    status text not null default 'active'
        check (status in ('active', 'past_due', 'canceled', 'paused', 'expired')),
    current_credits integer not null default 0,
    total_credits_allocated integer not null default 0,
    credits_used integer not null default 0,
    billing_cycle_start timestamptz not null default now(),
    billing_cycle_end timestamptz not null,
    next_billing_date timestamptz,
    cancel_at_period_end boolean not null default false,
    canceled_at timestamptz,
    cancellation_reason text,
    auto_renew boolean not null default true,
    started_at timestamptz not null default now(),
    ended_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint valid_billing_cycle check (billing_cycle_end > billing_cycle_start),
    constraint valid_credits check (current_credits >= 0)
);

-- public.repair_payments: escrow of repair payments.
-- supabase/migrations_backup/20250127000001_add_repair_quote_system.sql. The
-- state column is escrow_status; the hold lengths (7 days, 14 over the
-- high-value threshold) live in platform_fee_settings
-- (supabase/migrations/20251108100000_add_platform_fee_settings.sql).
create table if not exists public.repair_payments (
    id uuid primary key default gen_random_uuid(),
    quote_id uuid references public.repair_quotes (id) on delete cascade,
    customer_id uuid references public.profiles (id) on delete cascade,
    workshop_id uuid references public.organizations (id) on delete set null,
    mechanic_id uuid references public.mechanics (id) on delete set null,
    amount numeric(10, 2) not null,
    platform_fee numeric(10, 2) not null,
    provider_amount numeric(10, 2) not null,
    escrow_status text default 'held' check (escrow_status in (
        'held', 'released', 'refunded', 'disputed', 'partially_refunded')),
    held_at timestamptz default now(),
    released_at timestamptz,
    refunded_at timestamptz,
    stripe_payment_intent_id text,
    stripe_transfer_id text,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);

-- ---------------------------------------------------------------------------
-- Repairs after a quote.
--
-- public.quote_variance_requests: a revised quote more than 10% over the
-- original waits for the customer.
-- supabase/migrations_backup/20251207000002_quote_variance_protection_10_percent_rule.sql.
create table if not exists public.quote_variance_requests (
    id uuid primary key default gen_random_uuid(),
    original_quote_id uuid not null references public.repair_quotes (id) on delete cascade,
    revised_quote_id uuid references public.repair_quotes (id) on delete cascade,
    workshop_id uuid references public.organizations (id),
    customer_id uuid not null references public.profiles (id),
    original_total_cost numeric(10, 2) not null,
    revised_total_cost numeric(10, 2) not null,
    variance_reason text not null check (variance_reason in (
        'additional_parts_needed', 'additional_labor_required', 'unforeseen_damage_discovered',
        'part_price_increase', 'customer_requested_additional_work',
        'diagnostic_revealed_more_issues', 'other')),
    detailed_explanation text not null,
    status text default 'pending' check (status in (
        'pending', 'approved', 'declined', 'negotiating', 'expired', 'workshop_absorbed')),
    customer_response_at timestamptz,
    work_can_proceed boolean default false,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    expires_at timestamptz,
    constraint variance_amount_positive check (revised_total_cost > original_total_cost)
);

-- public.repair_jobs: supabase/migrations_backup/phase3/01_repair_job_tracking_up.sql.
create table if not exists public.repair_jobs (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    repair_quote_id uuid not null unique references public.repair_quotes (id) on delete cascade,
    customer_id uuid not null references public.profiles (id) on delete cascade,
    workshop_id uuid references public.organizations (id) on delete set null,
    mechanic_id uuid references public.mechanics (id) on delete set null,
    description text not null,
    status text default 'pending_parts' check (status in (
        'pending_parts', 'parts_received', 'repair_started', 'in_progress',
        'waiting_approval', 'quality_check', 'ready_for_pickup', 'completed',
        'on_hold', 'cancelled')),
    quote_accepted_at timestamptz not null,
    ready_for_pickup_at timestamptz,
    completed_at timestamptz,
    estimated_completion_date timestamptz,
    last_update_sent_at timestamptz,
    customer_notified_ready boolean default false,
    pickup_scheduled_at timestamptz,
    pickup_reminder_sent boolean default false,
    picked_up_at timestamptz,
    metadata jsonb default '{}'
);

-- ---------------------------------------------------------------------------
-- Corporate billing: supabase/migrations_backup/20251024000000_create_corporate_businesses.sql
-- (corporate_businesses reduced to the columns an invoice needs).
create table if not exists public.corporate_businesses (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    company_name text not null,
    company_email text not null unique,
    business_type text not null default 'other' check (business_type in (
        'fleet', 'dealership', 'repair_shop', 'rental', 'taxi_service', 'trucking', 'other'))
);

create table if not exists public.corporate_invoices (
    id uuid primary key default gen_random_uuid(),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    invoice_number text not null unique,
    corporate_id uuid not null references public.corporate_businesses (id) on delete cascade,
    billing_period_start date not null,
    billing_period_end date not null,
    total_amount numeric(10, 2) not null default 0,
    status text not null default 'draft'
        check (status in ('draft', 'sent', 'paid', 'overdue', 'cancelled', 'refunded')),
    sent_at timestamptz,
    due_date date,
    paid_at timestamptz,
    metadata jsonb default '{}'::jsonb
);

-- ---------------------------------------------------------------------------
-- public.account_deletion_queue: staged anonymisation.
-- supabase/migrations_backup/20251201000002_account_deletion_system.sql.
create table if not exists public.account_deletion_queue (
    id uuid primary key default gen_random_uuid(),
    customer_id uuid not null references public.profiles (id) on delete cascade,
    requested_at timestamptz default now(),
    requested_by uuid references public.profiles (id),
    deletion_reason text,
    status text not null default 'pending' check (status in (
        'pending', 'processing', 'completed', 'scheduled', 'cancelled', 'failed')),
    processing_started_at timestamptz,
    completed_at timestamptz,
    cancelled_at timestamptz,
    retention_schedule jsonb,
    full_anonymization_date date,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);
