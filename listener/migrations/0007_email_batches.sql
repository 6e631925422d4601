-- Email batches, frozen before their first attempt.
--
-- A batch of emails goes to Resend under ONE idempotency key, and Resend
-- sends it once only if every retry carries the same array under that key.
-- So the listener records a batch (its key, its exact payload, the ledger
-- entries whose emails it holds) before the first attempt, and after a crash
-- sends that record again instead of grouping the emails anew: a regrouped
-- batch would have another key and send its emails a second time.
--
-- States: 'frozen' (recorded; sent or about to be), 'superseded' (strictly
-- refused as invalid, so nothing of it was sent; its valid emails were frozen
-- again in a new batch that names it in supersedes).

-- The ledger names the batch of each action's emails. The ledger's v2
-- migration adds this column too; adding it here when absent is harmless.
alter table public.listener_ledger add column if not exists batch_key text;

create index if not exists listener_ledger_by_batch
    on public.listener_ledger (batch_key) where batch_key is not null;

create table if not exists public.listener_email_batches (
    batch_key      text        primary key check (char_length(batch_key) between 1 and 256),
    payload        jsonb       not null check (jsonb_typeof(payload) = 'array'),
    -- [{rule, table_name, row_key, due_at, emails: [email idempotency keys]}]
    members        jsonb       not null default '[]'::jsonb
                   check (jsonb_typeof(members) = 'array'),
    created_at     timestamptz not null default now(),
    state          text        not null default 'frozen'
                   check (state in ('frozen', 'superseded')),
    supersedes     text,
    holder         text        not null,
    fencing_token  bigint      not null
);

create index if not exists listener_email_batches_by_created
    on public.listener_email_batches (created_at);

alter table public.listener_email_batches enable row level security;

do $$
declare
    api_role text;
begin
    foreach api_role in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = api_role) then
            execute format('revoke all on public.listener_email_batches from %I', api_role);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant select, insert, update on public.listener_email_batches to service_role;
    end if;
end
$$;

-- The ledger's batch_key of every member, as rows (rule, table, key, due).
-- Works on both ledger layouts: keyed by (rule, table_name, row_key, due_at),
-- or by (rule, session_id, due_at) before the v2 migration (rows of sessions).
create or replace function public.listener_batch_member_keys(p_members jsonb)
returns table (rule text, table_name text, row_key text, due_at timestamptz, batch_key text)
language plpgsql
stable
security definer
set search_path = public, pg_temp
as $$
begin
    if exists (select 1 from pg_attribute
                where attrelid = 'public.listener_ledger'::regclass
                  and attname = 'row_key' and not attisdropped) then
        return query
            select m.rule, m.table_name, m.row_key, m.due_at, l.batch_key
              from jsonb_to_recordset(p_members)
                   as m(rule text, table_name text, row_key text, due_at timestamptz)
              join public.listener_ledger l
                on l.rule = m.rule and l.table_name = m.table_name
               and l.row_key = m.row_key and l.due_at = m.due_at;
    else
        return query
            select m.rule, m.table_name, m.row_key, m.due_at, l.batch_key
              from jsonb_to_recordset(p_members)
                   as m(rule text, table_name text, row_key text, due_at timestamptz)
              join public.listener_ledger l
                on m.table_name = 'sessions' and l.rule = m.rule
               and l.session_id::text = m.row_key and l.due_at = m.due_at;
    end if;
end
$$;

-- Record a batch before its first attempt, and point its members' ledger
-- rows at it. Fenced like every write. Answers:
--   {"outcome": "frozen"}   recorded (or recorded already with this payload);
--   {"outcome": "taken", "batches": [{batch_key, payload, members}, ...]}
--       some members are in batches frozen earlier (a crash came between):
--       nothing is changed; send those batches as recorded instead. A batch
--       already recorded under this key with another payload comes back the
--       same way: the recorded payload is the one sent under this key;
--   {"outcome": "fenced"}   this holder no longer holds the lease.
-- p_supersedes: the batch this one replaces (refused as invalid, nothing of
-- it sent); it is marked superseded and its members may move here.
create or replace function public.listener_batch_freeze_v1(
    p_batch_key text, p_payload jsonb, p_members jsonb, p_holder text, p_token bigint,
    p_supersedes text default null)
returns jsonb
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    existing public.listener_email_batches;
    recorded boolean;
    taken jsonb;
begin
    if p_batch_key is null or char_length(p_batch_key) not between 1 and 256 then
        raise exception 'listener_batch_freeze_v1: batch key must be 1 to 256 characters'
            using errcode = '22023';
    end if;
    if jsonb_typeof(p_payload) is distinct from 'array' or jsonb_array_length(p_payload) = 0 then
        raise exception 'listener_batch_freeze_v1: payload must be a non-empty array'
            using errcode = '22023';
    end if;
    if jsonb_typeof(coalesce(p_members, '[]'::jsonb)) <> 'array' then
        raise exception 'listener_batch_freeze_v1: members must be an array'
            using errcode = '22023';
    end if;
    if not public.listener_fence_ok(p_holder, p_token) then
        return jsonb_build_object('outcome', 'fenced');
    end if;

    select * into existing from public.listener_email_batches
     where batch_key = p_batch_key for update;
    recorded := found;
    if recorded and existing.payload <> p_payload then
        return jsonb_build_object('outcome', 'taken', 'batches', jsonb_build_array(
            jsonb_build_object('batch_key', existing.batch_key, 'payload', existing.payload,
                               'members', existing.members)));
    end if;

    select jsonb_agg(jsonb_build_object('batch_key', b.batch_key, 'payload', b.payload,
                                        'members', b.members))
      into taken
      from public.listener_email_batches b
     where b.state = 'frozen'
       and b.batch_key <> p_batch_key
       and b.batch_key is distinct from p_supersedes
       and b.batch_key in (select k.batch_key
                             from public.listener_batch_member_keys(coalesce(p_members, '[]'))
                                  as k
                            where k.batch_key is not null);
    if taken is not null then
        return jsonb_build_object('outcome', 'taken', 'batches', taken);
    end if;

    if recorded then
        -- Frozen again with the same payload (a retry of this call, or the same
        -- emails regrouped the same way): make sure it counts as frozen.
        update public.listener_email_batches
           set state = 'frozen', members = coalesce(p_members, '[]'::jsonb),
               supersedes = coalesce(p_supersedes, supersedes),
               holder = p_holder, fencing_token = p_token
         where batch_key = p_batch_key;
    else
        insert into public.listener_email_batches
               (batch_key, payload, members, supersedes, holder, fencing_token)
        values (p_batch_key, p_payload, coalesce(p_members, '[]'::jsonb), p_supersedes,
                p_holder, p_token);
    end if;
    if p_supersedes is not null and p_supersedes <> p_batch_key then
        update public.listener_email_batches set state = 'superseded'
         where batch_key = p_supersedes and state = 'frozen';
    end if;

    if exists (select 1 from pg_attribute
                where attrelid = 'public.listener_ledger'::regclass
                  and attname = 'row_key' and not attisdropped) then
        update public.listener_ledger l set batch_key = p_batch_key
          from jsonb_to_recordset(coalesce(p_members, '[]'))
               as m(rule text, table_name text, row_key text, due_at timestamptz)
         where l.rule = m.rule and l.table_name = m.table_name
           and l.row_key = m.row_key and l.due_at = m.due_at;
    else
        update public.listener_ledger l set batch_key = p_batch_key
          from jsonb_to_recordset(coalesce(p_members, '[]'))
               as m(rule text, table_name text, row_key text, due_at timestamptz)
         where m.table_name = 'sessions' and l.rule = m.rule
           and l.session_id::text = m.row_key and l.due_at = m.due_at;
    end if;

    -- Resend keeps idempotency keys 24 hours: a week-old batch can never be
    -- re-sent under its key, so its record is of no use.
    delete from public.listener_email_batches where created_at < now() - interval '7 days';
    return jsonb_build_object('outcome', 'frozen');
end
$$;

-- A frozen batch, to send it again as recorded after a crash:
-- {batch_key, payload, members, state, supersedes, created_at}, or null.
create or replace function public.listener_batch_v1(p_batch_key text)
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select jsonb_build_object('batch_key', b.batch_key, 'payload', b.payload,
                              'members', b.members, 'state', b.state,
                              'supersedes', b.supersedes, 'created_at', b.created_at)
      from public.listener_email_batches b
     where b.batch_key = p_batch_key
$$;

-- Only the owner and service_role may call these.
select public.listener_restrict_functions_v1('listener\_batch\_%');
