-- Every read and write the daemon makes. The SQL backend calls these over a
-- connection, the Supabase backend through PostgREST RPC: one semantics.
-- All are SECURITY DEFINER with a fixed search_path, and executable only by
-- the owner and service_role (see the end of this file).

-- The slice of a session row the rules read, with an opaque version for
-- compare-and-set. metadata is left out: it can be large and rules ignore it.
create or replace function public.listener_session_json(s public.sessions, version xid)
returns jsonb
language sql
immutable
as $$
    select (to_jsonb(s) - 'metadata') || jsonb_build_object('_version', version::text)
$$;

create or replace function public.listener_read_session(p_session_id uuid)
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select public.listener_session_json(s, s.xmin) from public.sessions s where s.id = p_session_id
$$;

-- The columns the rules read, with the row version: what the sweep loads.
create or replace function public.listener_rule_json(s public.sessions, version xid)
returns jsonb
language sql
immutable
as $$
    select jsonb_build_object(
        'id', s.id, 'status', s.status, 'mechanic_id', s.mechanic_id,
        'status_changed_at', s.status_changed_at, 'scheduled_for', s.scheduled_for,
        'started_at', s.started_at, 'expires_at', s.expires_at, 'ended_at', s.ended_at,
        'summary_submitted_at', s.summary_submitted_at, '_version', version::text)
$$;

-- Rows any rule may care about: open sessions, and completed ones that may
-- still owe a summary (ended after p_completed_since). Keyset pages by id.
create or replace function public.listener_tracked_sessions(
    p_after uuid default null,
    p_limit integer default 5000,
    p_completed_since timestamptz default null)
returns table (
    id text, status text, mechanic_id text, status_changed_at timestamptz,
    scheduled_for timestamptz, started_at timestamptz, expires_at timestamptz,
    ended_at timestamptz, summary_submitted_at timestamptz, _version text)
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    -- Columns, not JSON: at start-up this returns every open session, and
    -- building and parsing a JSON document per row costs several times more.
    select s.id::text, s.status, s.mechanic_id::text, s.status_changed_at, s.scheduled_for,
           s.started_at, s.expires_at, s.ended_at, s.summary_submitted_at, s.xmin::text
      from public.sessions s
     where (p_after is null or s.id > p_after)
       and (s.status in ('pending', 'scheduled', 'accepted', 'waiting', 'live', 'reconnecting')
            or (s.status = 'completed' and s.summary_submitted_at is null
                and s.mechanic_id is not null
                and (p_completed_since is null or coalesce(s.ended_at, s.status_changed_at)
                                                  >= p_completed_since)))
     order by s.id
     limit greatest(1, least(p_limit, 50000))
$$;

-- True when (holder, token) holds the unexpired lease. FOR SHARE makes a
-- takeover wait for the writes of the holder it replaces.
create or replace function public.listener_fence_ok(p_holder text, p_token bigint)
returns boolean
language sql
security definer
set search_path = public, pg_temp
as $$
    select exists (
        select 1 from public.listener_lease
         where name = 'listener' and holder = p_holder and fencing_token = p_token
           and expires_at > clock_timestamp()
           for share)
$$;

-- Act on a due episode (rule, session, due) in one transaction:
--  1. with p_version: the row must still be at that version (the state the
--     daemon decided on), else 'stale' with the row as it is now, and nothing
--     is claimed: the daemon re-checks its rule against it;
--  2. claim it in the ledger: 'done' if it already happened; a claim left
--     unfinished by a crashed or replaced holder is taken over;
--  3. with p_status: compare-and-set the status (must be one of p_expected),
--     merging metadata.listener and keeping every other key; 'conflict' with
--     the row when the status moved on (the claim stays for the daemon to
--     record as skipped);
--  4. with p_finish: complete the claim with that outcome.
-- 'fenced' when (p_holder, p_token) no longer holds the lease; 'missing' when
-- the row is gone and a row check was asked for.
create or replace function public.listener_fire(
    p_rule text, p_session_id uuid, p_due_at timestamptz,
    p_holder text, p_token bigint, p_fired_at timestamptz,
    p_version text default null, p_expected text[] default null,
    p_status text default null, p_reason text default null,
    p_finish text default null, p_lateness_ms bigint default null,
    p_detail jsonb default '{}'::jsonb)
returns jsonb
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    entry public.listener_ledger;
    s public.sessions;
    row_version xid;
    applied boolean := false;
    attempts integer := 1;
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return jsonb_build_object('outcome', 'fenced');
    end if;
    if p_version is not null or p_status is not null then
        select x.xmin into row_version from public.sessions x where x.id = p_session_id for update;
        if not found then
            return jsonb_build_object('outcome', 'missing');
        end if;
        select * into s from public.sessions where id = p_session_id;
        if p_version is not null and row_version::text <> p_version then
            return jsonb_build_object('outcome', 'stale',
                                      'row', public.listener_session_json(s, row_version));
        end if;
    end if;
    insert into public.listener_ledger (rule, session_id, due_at, holder, fencing_token, fired_at)
    values (p_rule, p_session_id, p_due_at, p_holder, p_token, p_fired_at)
    on conflict do nothing;
    if not found then
        select * into entry from public.listener_ledger
         where rule = p_rule and session_id = p_session_id and due_at = p_due_at for update;
        if entry.state <> 'claimed' then
            return jsonb_build_object('outcome', 'done');
        end if;
        update public.listener_ledger
           set holder = p_holder, fencing_token = p_token, attempts = listener_ledger.attempts + 1
         where rule = p_rule and session_id = p_session_id and due_at = p_due_at
        returning * into entry;
        applied := entry.status_applied;
        attempts := entry.attempts;
    end if;
    if p_status is not null and not applied then
        if p_expected is not null and not (s.status = any (p_expected)) then
            return jsonb_build_object('outcome', 'conflict', 'attempts', attempts,
                                      'row', public.listener_session_json(s, row_version));
        end if;
        update public.sessions x
           set status = p_status,
               metadata = coalesce(x.metadata, '{}'::jsonb) || jsonb_build_object(
                   'listener', jsonb_build_object('reason', p_reason, 'rule', p_rule,
                                                  'at', p_fired_at)),
               ended_at = case when p_status = 'completed' then coalesce(x.ended_at, p_fired_at)
                               else x.ended_at end,
               updated_at = now()
         where x.id = p_session_id;
        if p_status = 'cancelled' and exists (
            select 1 from information_schema.columns
             where table_schema = 'public' and table_name = 'sessions'
               and column_name = 'cancelled_at')
        then
            execute 'update public.sessions set cancelled_at = coalesce(cancelled_at, $1) '
                    'where id = $2' using p_fired_at, p_session_id;
        end if;
        update public.listener_ledger set status_applied = true
         where rule = p_rule and session_id = p_session_id and due_at = p_due_at;
        applied := true;
        select x.xmin into row_version from public.sessions x where x.id = p_session_id;
        select * into s from public.sessions where id = p_session_id;
    end if;
    if p_finish is not null then
        update public.listener_ledger
           set state = p_finish, fired_at = p_fired_at, lateness_ms = p_lateness_ms,
               detail = coalesce(p_detail, '{}'::jsonb), completed_at = clock_timestamp()
         where rule = p_rule and session_id = p_session_id and due_at = p_due_at;
    end if;
    return jsonb_build_object(
        'outcome', 'claimed', 'status_applied', applied, 'attempts', attempts,
        'row', case when row_version is null then null
                    else public.listener_session_json(s, row_version) end);
end
$$;

-- Finish a claim with its outcome. False when fenced or not ours.
create or replace function public.listener_complete(
    p_rule text, p_session_id uuid, p_due_at timestamptz,
    p_holder text, p_token bigint, p_outcome text, p_fired_at timestamptz,
    p_lateness_ms bigint, p_detail jsonb default '{}'::jsonb)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return false;
    end if;
    update public.listener_ledger
       set state = p_outcome, fired_at = p_fired_at, lateness_ms = p_lateness_ms,
           detail = coalesce(p_detail, '{}'::jsonb), completed_at = clock_timestamp()
     where rule = p_rule and session_id = p_session_id and due_at = p_due_at
       and state = 'claimed' and holder = p_holder and fencing_token = p_token;
    return found;
end
$$;

-- Claims a crash or a lost lease left unfinished, older than p_older_than.
create or replace function public.listener_unfinished_claims(p_older_than interval default '0')
returns setof jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select jsonb_build_object('rule', rule, 'session_id', session_id, 'due_at', due_at,
                              'status_applied', status_applied, 'attempts', attempts,
                              'fired_at', fired_at)
      from public.listener_ledger
     where state = 'claimed' and claimed_at <= clock_timestamp() - p_older_than
     order by claimed_at
     limit 1000
$$;

-- Who to email about a session: the app's columns, read with the owner's
-- rights (auth.users is not readable by the API roles).
create or replace function public.listener_session_contacts(p_session_id uuid)
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select jsonb_build_object(
        'customer_email', u.email, 'customer_name', p.full_name,
        'mechanic_email', m.email, 'mechanic_name', m.name)
      from public.sessions s
      left join auth.users u on u.id = s.customer_user_id
      left join public.profiles p on p.id = s.customer_user_id
      left join public.mechanics m on m.id = s.mechanic_id
     where s.id = p_session_id
$$;

-- The lease. Acquire returns the fencing token when p_holder now holds it
-- (new holders get a new token), null while another holder's lease runs.
create or replace function public.listener_lease_acquire(p_holder text, p_ttl_ms integer)
returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    lease public.listener_lease;
begin
    insert into public.listener_lease (name) values ('listener') on conflict do nothing;
    select * into lease from public.listener_lease where name = 'listener' for update;
    if lease.holder = p_holder and lease.expires_at > clock_timestamp() then
        update public.listener_lease
           set expires_at = clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0),
               renewed_at = clock_timestamp()
         where name = 'listener';
        return lease.fencing_token;
    end if;
    if lease.holder is null or lease.expires_at <= clock_timestamp() then
        update public.listener_lease
           set holder = p_holder, fencing_token = fencing_token + 1,
               expires_at = clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0),
               acquired_at = clock_timestamp(), renewed_at = clock_timestamp()
         where name = 'listener'
        returning fencing_token into lease.fencing_token;
        return lease.fencing_token;
    end if;
    return null;
end
$$;

create or replace function public.listener_lease_renew(p_holder text, p_token bigint,
                                                       p_ttl_ms integer)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    update public.listener_lease
       set expires_at = clock_timestamp() + make_interval(secs => p_ttl_ms / 1000.0),
           renewed_at = clock_timestamp()
     where name = 'listener' and holder = p_holder and fencing_token = p_token;
    return found;
end
$$;

create or replace function public.listener_lease_release(p_holder text, p_token bigint)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    update public.listener_lease set holder = null, expires_at = '-infinity'
     where name = 'listener' and holder = p_holder and fencing_token = p_token;
    return found;
end
$$;

-- Only the owner and service_role may call these: revoke what PostgreSQL
-- (PUBLIC) and Supabase's default privileges (anon, authenticated) grant.
do $$
declare
    fn text;
    api_role text;
begin
    for fn in
        select p.oid::regprocedure::text
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.proname like 'listener\_%'
    loop
        execute format('revoke all on function %s from public', fn);
        foreach api_role in array array['anon', 'authenticated'] loop
            if exists (select 1 from pg_roles where rolname = api_role) then
                execute format('revoke all on function %s from %I', fn, api_role);
            end if;
        end loop;
        if exists (select 1 from pg_roles where rolname = 'service_role') then
            execute format('grant execute on function %s to service_role', fn);
        end if;
    end loop;
end
$$;
