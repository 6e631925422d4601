-- The ledger: one row per claimed action (rule, session, due instant), the
-- proof that it happened once. The app's admin dashboard reads it.
create table if not exists public.listener_ledger (
    rule            text        not null,
    session_id      uuid        not null,
    due_at          timestamptz not null,
    state           text        not null default 'claimed'
                    check (state in ('claimed', 'fired', 'skipped', 'late', 'failed')),
    -- The status change part is done (a retry after a crash only sends the emails).
    status_applied  boolean     not null default false,
    attempts        integer     not null default 1,
    holder          text        not null,
    fencing_token   bigint      not null,
    claimed_at      timestamptz not null default now(),
    fired_at        timestamptz,
    completed_at    timestamptz,
    lateness_ms     bigint,
    detail          jsonb       not null default '{}'::jsonb,
    primary key (rule, session_id, due_at)
);

create index if not exists listener_ledger_by_session
    on public.listener_ledger (session_id, due_at desc);
create index if not exists listener_ledger_unfinished
    on public.listener_ledger (claimed_at) where state = 'claimed';

-- One active instance: whoever holds the lease acts; its fencing token goes up
-- on every change of holder and every write checks it.
create table if not exists public.listener_lease (
    name           text        primary key,
    holder         text,
    fencing_token  bigint      not null default 0,
    expires_at     timestamptz not null default '-infinity',
    acquired_at    timestamptz,
    renewed_at     timestamptz
);

-- Row level security on, no policies: only the owner and roles that bypass RLS
-- (Supabase's service_role) see these tables through the API.
alter table public.listener_ledger enable row level security;
alter table public.listener_lease enable row level security;

do $$
declare
    api_role text;
begin
    foreach api_role in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = api_role) then
            execute format('revoke all on public.listener_ledger, public.listener_lease, '
                           'public.listener_migrations from %I', api_role);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant select, insert, update on public.listener_ledger, public.listener_lease,
            public.listener_migrations to service_role;
    end if;
end
$$;
