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

-- Rows any rule may care about: open sessions, and completed ones that may
-- still owe a summary (ended after p_completed_since). Keyset pages by id.
create or replace function public.listener_tracked_sessions(
    p_after uuid default null,
    p_limit integer default 5000,
    p_completed_since timestamptz default null)
returns setof jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select public.listener_session_json(s, s.xmin)
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

-- Claim (rule, session, due). 'claimed': go ahead (status_applied says a
-- previous attempt already changed the status); 'done': it already happened;
-- 'fenced': this instance no longer holds the lease.
create or replace function public.listener_claim(
    p_rule text, p_session_id uuid, p_due_at timestamptz,
    p_holder text, p_token bigint, p_fired_at timestamptz)
returns jsonb
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    entry public.listener_ledger;
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return jsonb_build_object('outcome', 'fenced');
    end if;
    insert into public.listener_ledger (rule, session_id, due_at, holder, fencing_token, fired_at)
    values (p_rule, p_session_id, p_due_at, p_holder, p_token, p_fired_at)
    on conflict do nothing;
    if found then
        return jsonb_build_object('outcome', 'claimed', 'status_applied', false, 'attempts', 1);
    end if;
    select * into entry from public.listener_ledger
     where rule = p_rule and session_id = p_session_id and due_at = p_due_at
       for update;
    if entry.state <> 'claimed' then
        return jsonb_build_object('outcome', 'done');
    end if;
    -- Left unfinished by a crashed or replaced holder: the lease says it is ours now.
    update public.listener_ledger
       set holder = p_holder, fencing_token = p_token, attempts = attempts + 1
     where rule = p_rule and session_id = p_session_id and due_at = p_due_at
    returning * into entry;
    return jsonb_build_object('outcome', 'claimed', 'status_applied', entry.status_applied,
                              'attempts', entry.attempts);
end
$$;

-- Compare-and-set of the session's status for a claimed action, in one
-- transaction with the ledger. 'applied' with the new row; 'conflict' with the
-- row as it is (status not expected, or changed since p_version was read);
-- 'missing'; 'fenced'. Merges metadata.listener, keeps every other key.
create or replace function public.listener_transition(
    p_rule text, p_session_id uuid, p_due_at timestamptz,
    p_holder text, p_token bigint, p_expected text[], p_version text,
    p_status text, p_reason text, p_at timestamptz)
returns jsonb
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    s public.sessions;
    current_version xid;
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return jsonb_build_object('outcome', 'fenced');
    end if;
    perform 1 from public.listener_ledger
     where rule = p_rule and session_id = p_session_id and due_at = p_due_at
       and state = 'claimed' and holder = p_holder and fencing_token = p_token
       for update;
    if not found then
        return jsonb_build_object('outcome', 'fenced');
    end if;
    select x.xmin into current_version from public.sessions x where x.id = p_session_id for update;
    if not found then
        return jsonb_build_object('outcome', 'missing');
    end if;
    select * into s from public.sessions where id = p_session_id;
    if not (s.status = any (p_expected))
       or (p_version is not null and current_version::text <> p_version) then
        return jsonb_build_object('outcome', 'conflict',
                                  'row', public.listener_session_json(s, current_version));
    end if;
    update public.sessions x
       set status = p_status,
           metadata = coalesce(x.metadata, '{}'::jsonb) || jsonb_build_object(
               'listener', jsonb_build_object('reason', p_reason, 'rule', p_rule, 'at', p_at)),
           ended_at = case when p_status = 'completed' then coalesce(x.ended_at, p_at)
                           else x.ended_at end,
           updated_at = now()
     where x.id = p_session_id;
    if p_status = 'cancelled' and exists (
        select 1 from information_schema.columns
         where table_schema = 'public' and table_name = 'sessions' and column_name = 'cancelled_at')
    then
        execute 'update public.sessions set cancelled_at = coalesce(cancelled_at, $1) where id = $2'
          using p_at, p_session_id;
    end if;
    update public.listener_ledger set status_applied = true
     where rule = p_rule and session_id = p_session_id and due_at = p_due_at;
    select x.xmin into current_version from public.sessions x where x.id = p_session_id;
    select * into s from public.sessions where id = p_session_id;
    return jsonb_build_object('outcome', 'applied',
                              'row', public.listener_session_json(s, current_version));
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
