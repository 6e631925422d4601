-- The operations report: one function that computes every figure of the
-- report in the database (so a million-row ledger never crosses the wire),
-- and views the app's admin pages read. Everything here is readable or
-- callable by the service role only.

-- Failures are few: their own index serves the report's list and the view.
create index if not exists listener_ledger_failed
    on public.listener_ledger (fired_at) where state = 'failed';
-- The admin pages read the daily view by day.
create index if not exists listener_ledger_by_fired_day
    on public.listener_ledger (((fired_at at time zone 'UTC')::date));

-- Listener health the lease row does not hold: the last full reconcile.
create table if not exists public.listener_health (
    name               text        primary key default 'listener',
    holder             text,
    last_reconcile_at  timestamptz,
    last_drift         bigint      not null default 0,
    updated_at         timestamptz not null default now()
);
alter table public.listener_health enable row level security;

-- The daemon notes each finished reconcile (who ran it, how many rows differed).
create or replace function public.listener_note_reconcile_v1(p_holder text, p_at timestamptz,
                                                          p_drift bigint default 0)
returns void
language sql
security definer
set search_path = public, pg_temp
as $$
    insert into public.listener_health (name, holder, last_reconcile_at, last_drift, updated_at)
    values ('listener', p_holder, p_at, coalesce(p_drift, 0), now())
    on conflict (name) do update
       set holder = excluded.holder, last_reconcile_at = excluded.last_reconcile_at,
           last_drift = excluded.last_drift, updated_at = excluded.updated_at
$$;

-- Why an action failed, as one line: the executor's own words first, then the
-- per-recipient email errors, then the webhook's answer, else the raw detail.
create or replace function public.listener_report_reason_v1(p_detail jsonb)
returns text
language sql
immutable
set search_path = public, pg_temp
as $$
    select coalesce(
        p_detail->>'why',
        case when jsonb_typeof(p_detail->'email_errors') = 'object' then
            (select string_agg(e.key || ': ' || e.value, '; ' order by e.key)
               from jsonb_each_text(p_detail->'email_errors') e)
        end,
        case when jsonb_typeof(p_detail->'webhook') = 'object' then
            coalesce(p_detail->'webhook'->>'error', p_detail->'webhook'->>'status')
        end,
        p_detail->>'error',
        nullif(p_detail::text, '{}'))
$$;

-- The figures of the report over [p_since, p_until), by the instant each
-- action fired (the ledger's index on fired_at serves the window). Outcomes
-- are the finished states; claims still open are listed apart (whatever their
-- age), as is the lease. Lateness histograms count into fixed buckets (edges
-- in ms) so reports of different windows compare.
create or replace function public.listener_report_v1(p_since timestamptz, p_until timestamptz)
returns jsonb
language plpgsql
stable
security definer
set search_path = public, pg_temp
as $$
declare
    edges bigint[] := array[0, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2000, 5000, 10000,
                            60000, 300000, 3600000];
    step interval;
    result jsonb;
begin
    if p_since is null or p_until is null or p_until <= p_since then
        raise exception 'listener_report_v1: need p_since < p_until, got % and %', p_since, p_until
            using errcode = '22023';
    end if;
    -- Hours up to two days, else days: a readable number of bars either way.
    step := case when p_until - p_since <= interval '2 days' then interval '1 hour'
                 else interval '1 day' end;

    with finished as materialized (
        -- names compared bytewise: grouping a million rows by rule sorts them
        select l.rule collate "C" as rule, l.table_name collate "C" as table_name,
               l.state, l.lateness_ms,
               -- bucket 0 is "early" (negative), n is ">= last edge"; null without lateness
               width_bucket(l.lateness_ms, edges) as bucket,
               date_bin(step, l.fired_at, timestamptz '2000-01-01 00:00:00+00') as slot
          from public.listener_ledger l
         where l.fired_at >= p_since and l.fired_at < p_until
           and l.state in ('fired', 'skipped', 'late', 'failed')
    ),
    per_rule as (
        select f.rule, f.table_name,
               count(*) filter (where f.state = 'fired') as fired,
               count(*) filter (where f.state = 'skipped') as skipped,
               count(*) filter (where f.state = 'late') as late,
               count(*) filter (where f.state = 'failed') as failed,
               percentile_cont(array[0.5, 0.95, 0.99]) within group (order by f.lateness_ms)
                   as pct,
               max(f.lateness_ms) as max_ms
          from finished f
         group by f.rule, f.table_name
    ),
    -- The histograms and the timeline are sums over these few cells: one
    -- hashed pass over the window instead of one per figure.
    cells as (
        select f.rule, f.table_name, f.bucket, f.slot, f.state, count(*) as n
          from finished f
         group by f.rule, f.table_name, f.bucket, f.slot, f.state
    ),
    per_rule_bucket as (
        select c.rule, c.table_name, c.bucket, sum(c.n) as n
          from cells c
         where c.bucket is not null
         group by c.rule, c.table_name, c.bucket
    ),
    per_rule_histogram as (
        select r.rule, r.table_name,
               jsonb_agg(coalesce(b.n, 0) order by i) as counts
          from per_rule r
         cross join generate_series(0, array_length(edges, 1)) i
          left join per_rule_bucket b
            on b.rule = r.rule and b.table_name = r.table_name and b.bucket = i
         group by r.rule, r.table_name
    ),
    all_buckets as (
        select i, coalesce(sum(b.n), 0)::bigint as n
          from generate_series(0, array_length(edges, 1)) i
          left join per_rule_bucket b on b.bucket = i
         group by i
    ),
    slots as (
        select s as at
          from generate_series(date_bin(step, p_since, timestamptz '2000-01-01 00:00:00+00'),
                               p_until - interval '1 microsecond', step) s
    ),
    per_slot as (
        select c.slot as at,
               sum(c.n) filter (where c.state = 'fired') as fired,
               sum(c.n) filter (where c.state = 'skipped') as skipped,
               sum(c.n) filter (where c.state = 'late') as late,
               sum(c.n) filter (where c.state = 'failed') as failed
          from cells c
         group by c.slot
    ),
    failures as (
        select l.rule, l.table_name, l.row_key, l.session_id, l.due_at, l.fired_at,
               l.completed_at, l.attempts, l.lateness_ms,
               public.listener_report_reason_v1(l.detail) as reason
          from public.listener_ledger l
         where l.fired_at >= p_since and l.fired_at < p_until and l.state = 'failed'
         order by l.fired_at desc
         limit 200
    ),
    unfinished as (
        select l.rule, l.table_name, l.row_key, l.session_id, l.due_at, l.claimed_at,
               l.fired_at, l.holder, l.attempts, l.status_applied
          from public.listener_ledger l
         where l.state = 'claimed'
         order by l.claimed_at
         limit 200
    )
    select jsonb_build_object(
        'since', p_since,
        'until', p_until,
        'generated_at', now(),
        'step', case when step = interval '1 hour' then 'hour' else 'day' end,
        'rules', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'rule', r.rule, 'table', r.table_name,
                       'outcomes', jsonb_build_object('fired', r.fired, 'skipped', r.skipped,
                                                      'late', r.late, 'failed', r.failed),
                       'total', r.fired + r.skipped + r.late + r.failed,
                       -- to the microsecond: finer is float noise
                       'lateness_ms', jsonb_build_object(
                           'p50', round(r.pct[1]::numeric, 3), 'p95', round(r.pct[2]::numeric, 3),
                           'p99', round(r.pct[3]::numeric, 3), 'max', r.max_ms),
                       'histogram', h.counts)
                   order by r.table_name, r.rule)
              from per_rule r
              join per_rule_histogram h on h.rule = r.rule and h.table_name = r.table_name),
            '[]'::jsonb),
        'histogram', jsonb_build_object(
            'edges_ms', to_jsonb(edges),
            'counts', (select jsonb_agg(b.n order by b.i) from all_buckets b)),
        'timeline', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'at', s.at,
                       'fired', coalesce(p.fired, 0), 'skipped', coalesce(p.skipped, 0),
                       'late', coalesce(p.late, 0), 'failed', coalesce(p.failed, 0))
                   order by s.at)
              from slots s left join per_slot p on p.at = s.at),
            '[]'::jsonb),
        'failures', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'rule', f.rule, 'table', f.table_name, 'row_id', f.row_key,
                       'session_id', f.session_id, 'due_at', f.due_at, 'fired_at', f.fired_at,
                       'completed_at', f.completed_at, 'attempts', f.attempts,
                       'lateness_ms', f.lateness_ms, 'reason', f.reason)
                   order by f.fired_at desc)
              from failures f),
            '[]'::jsonb),
        'failures_total', (select coalesce(sum(r.failed), 0) from per_rule r),
        'unfinished', coalesce((
            select jsonb_agg(jsonb_build_object(
                       'rule', u.rule, 'table', u.table_name, 'row_id', u.row_key,
                       'session_id', u.session_id, 'due_at', u.due_at,
                       'claimed_at', u.claimed_at, 'fired_at', u.fired_at, 'holder', u.holder,
                       'attempts', u.attempts, 'status_applied', u.status_applied)
                   order by u.claimed_at)
              from unfinished u),
            '[]'::jsonb),
        'health', (
            select jsonb_build_object(
                       'lease_holder', case when le.expires_at > now() then le.holder end,
                       'lease_expires_at', le.expires_at, 'lease_renewed_at', le.renewed_at,
                       'fencing_token', le.fencing_token,
                       'last_reconcile_at', h.last_reconcile_at, 'last_drift', h.last_drift)
              from (select 1) one
              left join public.listener_lease le on le.name = 'listener'
              left join public.listener_health h on h.name = 'listener'))
      into result;
    return result;
end
$$;

-- Views for the app's admin pages. security_invoker: they read the ledger with
-- the caller's rights, so row level security applies to whoever asks (the
-- service role bypasses it; nobody else is granted them).

-- Per rule and UTC day: counts by outcome and lateness percentiles.
create or replace view public.listener_report_daily
with (security_invoker = true) as
select l.rule,
       l.table_name,
       (l.fired_at at time zone 'UTC')::date as day,
       count(*) filter (where l.state = 'fired') as fired,
       count(*) filter (where l.state = 'skipped') as skipped,
       count(*) filter (where l.state = 'late') as late,
       count(*) filter (where l.state = 'failed') as failed,
       round((percentile_cont(0.5) within group (order by l.lateness_ms))::numeric, 3)
           as lateness_p50_ms,
       round((percentile_cont(0.95) within group (order by l.lateness_ms))::numeric, 3)
           as lateness_p95_ms,
       round((percentile_cont(0.99) within group (order by l.lateness_ms))::numeric, 3)
           as lateness_p99_ms,
       max(l.lateness_ms) as lateness_max_ms
  from public.listener_ledger l
 where l.state in ('fired', 'skipped', 'late', 'failed') and l.fired_at is not null
 group by l.rule, l.table_name, (l.fired_at at time zone 'UTC')::date;

-- Failures of the last 7 days, newest first, with a one-line reason.
create or replace view public.listener_report_failures
with (security_invoker = true) as
select l.rule, l.table_name, l.row_key, l.session_id, l.due_at, l.fired_at, l.completed_at,
       l.attempts, l.lateness_ms, public.listener_report_reason_v1(l.detail) as reason, l.detail
  from public.listener_ledger l
 where l.state = 'failed' and l.fired_at >= now() - interval '7 days'
 order by l.fired_at desc;

-- Claims not finished yet (a crash or a lost lease leaves them; the next
-- active instance resumes them), oldest first.
create or replace view public.listener_report_unfinished
with (security_invoker = true) as
select l.rule, l.table_name, l.row_key, l.session_id, l.due_at, l.claimed_at, l.fired_at,
       l.holder, l.attempts, l.status_applied,
       extract(epoch from now() - l.claimed_at)::bigint as age_s
  from public.listener_ledger l
 where l.state = 'claimed'
 order by l.claimed_at;

-- One row: who holds the lease, when it was renewed, the last reconcile.
create or replace view public.listener_report_health
with (security_invoker = true) as
select case when le.expires_at > now() then le.holder end as lease_holder,
       le.fencing_token,
       le.acquired_at as lease_acquired_at,
       le.renewed_at as lease_renewed_at,
       le.expires_at as lease_expires_at,
       h.last_reconcile_at,
       h.holder as last_reconcile_holder,
       h.last_drift
  from (select 1) one
  left join public.listener_lease le on le.name = 'listener'
  left join public.listener_health h on h.name = 'listener';

-- Only the owner and service_role: revoke what PostgreSQL (PUBLIC) and
-- Supabase's default privileges (anon, authenticated) grant on new objects.
select public.listener_restrict_functions_v1('listener\_report\_%');
select public.listener_restrict_functions_v1('listener\_note\_reconcile\_%');
do $$
declare
    api_role text;
begin
    revoke all on public.listener_health, public.listener_report_daily,
        public.listener_report_failures, public.listener_report_unfinished,
        public.listener_report_health from public;
    foreach api_role in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = api_role) then
            execute format('revoke all on public.listener_health, public.listener_report_daily, '
                           'public.listener_report_failures, public.listener_report_unfinished, '
                           'public.listener_report_health from %I', api_role);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant select, insert, update on public.listener_health to service_role;
        grant select on public.listener_report_daily, public.listener_report_failures,
            public.listener_report_unfinished, public.listener_report_health to service_role;
    end if;
end
$$;
