-- `listener audit`: read-only questions about a live database. Which rows owe
-- a rule an action that never happened, which deadline-like columns no rule
-- reads, which pg_cron jobs exist, how healthy the ledger is, which values in
-- the data no rule knows. Every function only reads (STABLE, so PostgREST runs
-- it in a read-only transaction); table and column names come from JSON and
-- reach SQL only through format('%I') and values through format('%L').

-- Per condition of a TableQuery: rows it applies to now (owing), rows whose
-- due instant is older than now() - p_grace with no ledger row for exactly
-- (rule, table, key, due) (overdue), the oldest such due instant and up to
-- p_sample of their keys, oldest first. A condition whose table or columns are
-- missing gets `missing` and no counts. Whether a condition holds and what its
-- anchors are come from the sweep's own SQL (listener_condition_sql_v2,
-- listener_anchor_sql_v2), so the audit counts exactly the rows the listener
-- tracks; the due instant is greatest(anchor instants) + offset.
create or replace function public.listener_audit_overdue_v1(p_query jsonb, p_grace interval,
                                                            p_sample integer default 5)
returns table (rule text, missing text[], owing bigint, overdue bigint,
               oldest_overdue timestamptz, sample_keys text[])
language plpgsql
stable
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
set statement_timeout = '60s'
-- Its row estimates are poor (a VALUES row per condition): compiling would
-- cost more than the scan.
set jit = off
as $$
declare
    v_table text := p_query->>'table';
    v_key text := coalesce(p_query->>'key', 'id');
    v_status text := p_query->>'status';
    v_columns jsonb := public.listener_table_columns_v2(p_query->>'table');
    v_condition jsonb;
    v_anchor jsonb;
    v_term jsonb;
    v_column text;
    v_missing text[];
    v_instants text[];
    v_expr text;
    v_values text[] := '{}';
    v_dues text[] := '{}';
    v_lates text[] := '{}';
    v_some text[] := '{}';
    v_all_statuses text[] := '{}';
    v_any_status boolean := false;
    v_missing_of jsonb := '{}';
    v_sql text;
begin
    if jsonb_array_length(coalesce(p_query->'conditions', '[]')) = 0 then
        return;
    end if;
    for v_condition in select * from jsonb_array_elements(p_query->'conditions') loop
        v_missing := '{}';
        v_instants := '{}';
        if v_columns is null then
            v_missing := array[v_table];
        else
            -- What the condition reads and the table lacks: the reason it is inactive.
            for v_column in
                select c from unnest(array[v_key, v_status]) c where c is not null
                union all select jsonb_array_elements_text(v_condition->'present')
                union all select jsonb_array_elements_text(v_condition->'absent')
                union all select coalesce(a->>'column', a->'derived'->>'start')
                            from jsonb_array_elements(v_condition->'anchors') a
                union all select l->>'column'
                            from jsonb_array_elements(v_condition->'anchors') a,
                                 jsonb_array_elements(coalesce(a->'derived'->'lookups', '[]')) l
            loop
                if not v_columns ? v_column then
                    v_missing := v_missing || v_column;
                end if;
            end loop;
            for v_anchor in select * from jsonb_array_elements(v_condition->'anchors') loop
                v_expr := public.listener_anchor_sql_v2(v_columns, v_table, v_key, v_anchor, 't');
                if v_expr is null then
                    -- Present but not a time: the sweep cannot use it either.
                    v_missing := v_missing || (coalesce(v_anchor->>'column',
                        v_anchor->'derived'->>'start') || ' (not a timestamp)');
                else
                    v_instants := v_instants || v_expr;
                end if;
            end loop;
            if cardinality(v_instants) = 0 and cardinality(v_missing) = 0 then
                v_missing := array['(no anchor)'];
            end if;
        end if;
        if cardinality(v_missing) > 0 then
            v_missing_of := v_missing_of || jsonb_build_object(v_condition->>'rule',
                (select jsonb_agg(distinct m) from unnest(v_missing) m));
            continue;
        end if;
        if jsonb_array_length(coalesce(v_condition->'statuses', '[]')) > 0 then
            v_all_statuses := v_all_statuses
                || (select array_agg(s) from jsonb_array_elements_text(v_condition->'statuses') s);
        else
            v_any_status := true;
        end if;
        v_dues := v_dues || format(
            'case when %s then greatest(%s) + %s * interval ''1 microsecond'' end as d%s',
            public.listener_condition_sql_v2(
                v_columns, jsonb_set(p_query, '{conditions}', jsonb_build_array(v_condition)), 't'),
            array_to_string(v_instants, ', '), (v_condition->>'offset_us')::bigint,
            cardinality(v_dues) + 1);
        v_values := v_values || format(
            'select %1$L, count(d%2$s), count(*) filter (where l%2$s), '
            'min(d%2$s) filter (where l%2$s), '
            '(array_agg(k order by d%2$s, k) filter (where l%2$s))[1:$2] from s',
            v_condition->>'rule', cardinality(v_dues));
        v_lates := v_lates || format(
            'case when d%1$s < now() - $1 then not exists (select 1 from public.listener_ledger l'
            ' where l.rule = %2$L and l.table_name = %3$L and l.row_key = s.k'
            ' and l.due_at = s.d%1$s) else false end as l%1$s',
            cardinality(v_dues), v_condition->>'rule', v_table);
        v_some := v_some || format('d%s is not null', cardinality(v_dues));
    end loop;

    if cardinality(v_values) > 0 then
        -- One pass over the table computes every condition's due instant
        -- (`offset 0` keeps the child sums, subplans, evaluated once per row);
        -- the rows some condition holds for are kept, then counted per condition.
        v_sql := format($q$
            with s as materialized (
                select s.*, %1$s
                  from (select t.%2$I::text as k, %3$s from public.%4$I t %5$s offset 0) s
                 where %6$s)
            %7$s$q$,
            array_to_string(v_lates, ', '), v_key, array_to_string(v_dues, ', '), v_table,
            -- Every condition names its statuses: only those rows (an index
            -- on the status column applies).
            case when v_any_status then ''
                 else format('where t.%I::text = any(%L::text[])', v_status,
                             (select array_agg(distinct x) from unnest(v_all_statuses) x)) end,
            array_to_string(v_some, ' or '),
            array_to_string(v_values, ' union all '));
    else
        v_sql := 'select null::text, 0::bigint, 0::bigint, null::timestamptz, null::text[] where false';
    end if;

    return query execute format($q$
        select cond.rule, (select array_agg(m) from jsonb_array_elements_text(%1$L::jsonb -> cond.rule) m),
               case when %1$L::jsonb ? cond.rule then null else coalesce(a.owing, 0) end,
               case when %1$L::jsonb ? cond.rule then null else coalesce(a.overdue, 0) end,
               a.oldest, coalesce(a.sample, '{}')
          from (select e->>'rule' as rule, ord
                  from jsonb_array_elements(%2$L::jsonb) with ordinality as x(e, ord)) cond
          left join (%3$s) a(rule, owing, overdue, oldest, sample) on a.rule = cond.rule
         order by cond.ord$q$,
        v_missing_of, p_query->'conditions', v_sql)
        using p_grace, p_sample;
end
$$;

-- Deadline-like columns of public tables (timestamp types whose names say
-- expiry, deadline, until, due, scheduled, ...) that no rule reads: p_read is
-- {table: [columns rules read]}. With p_count, how many rows are already past
-- each, counted up to p_cap (an index on the column makes that cheap; without
-- one the scan stops at the cap). p_table limits it to one table, so a caller
-- can bound each table by its own statement timeout.
create or replace function public.listener_audit_deadline_columns_v1(
    p_read jsonb, p_table text default null, p_count boolean default true,
    p_cap integer default 10000)
returns table (table_name text, column_name text, data_type text, indexed boolean,
               past bigint, past_capped boolean)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
set statement_timeout = '60s'
as $$
declare
    v record;
    v_now text;
    v_past bigint;
begin
    for v in
        select c.relname::text as t, a.attname::text as col,
               format_type(a.atttypid, a.atttypmod) as typ,
               exists (select 1 from pg_index i
                        where i.indrelid = c.oid and i.indkey[0] = a.attnum
                          and i.indpred is null) as has_index
          from pg_class c
          join pg_namespace n on n.oid = c.relnamespace
          join pg_attribute a on a.attrelid = c.oid
         where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relispartition
           and a.attnum > 0 and not a.attisdropped
           and a.atttypid in ('timestamptz'::regtype, 'timestamp'::regtype)
           and c.relname !~ '^listener_'
           and a.attname ~ '(expires_at|expire_at|expires$|deadline|_until$|(^|_)due(_|$)|^scheduled_|expiry|expiration|_ends_at$|^ends_at$)'
           and not coalesce(p_read -> c.relname::text ? a.attname::text, false)
           and (p_table is null or c.relname = p_table)
         order by c.relname, a.attnum
    loop
        v_past := null;
        if p_count then
            v_now := case when v.typ = 'timestamp without time zone'
                          then '(now() at time zone ''UTC'')' else 'now()' end;
            execute format('select count(*) from (select 1 from public.%I where %I < %s limit %s) x',
                           v.t, v.col, v_now, p_cap)
               into v_past;
        end if;
        table_name := v.t;
        column_name := v.col;
        data_type := v.typ;
        indexed := v.has_index;
        past := v_past;
        past_capped := v_past is not null and v_past >= p_cap;
        return next;
    end loop;
end
$$;

-- The jobs of pg_cron (cron.job) when the extension is installed here and this
-- function's owner may read them: {"installed", "readable", "error", "jobs":
-- [{jobid, jobname, schedule, command, active, username}]}. Missing rights are
-- a flag in the answer, never an error.
create or replace function public.listener_audit_cron_v1()
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    v_jobs jsonb;
begin
    if not exists (select 1 from pg_extension where extname = 'pg_cron') then
        return jsonb_build_object('installed', false, 'readable', false, 'error', null,
                                  'jobs', '[]'::jsonb);
    end if;
    begin
        execute $q$
            select coalesce(jsonb_agg(jsonb_build_object(
                       'jobid', jobid, 'jobname', jobname, 'schedule', schedule,
                       'command', command, 'active', active, 'username', username)
                       order by jobid), '[]'::jsonb)
              from cron.job$q$ into v_jobs;
    exception when insufficient_privilege or undefined_table or invalid_schema_name then
        return jsonb_build_object('installed', true, 'readable', false, 'error', sqlerrm,
                                  'jobs', '[]'::jsonb);
    end;
    return jsonb_build_object('installed', true, 'readable', true, 'error', null, 'jobs', v_jobs);
end
$$;

-- Ledger health: claims unfinished for longer than p_stuck_after (up to
-- p_sample of them, oldest first, and their count), failures in the last
-- p_window by rule, lateness percentiles over that window, the lease.
create or replace function public.listener_audit_ledger_v1(
    p_stuck_after interval default '5 minutes', p_window interval default '24 hours',
    p_sample integer default 10)
returns jsonb
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
as $$
begin
    return jsonb_build_object(
        'stuck_count', (select count(*) from public.listener_ledger
                         where state = 'claimed' and claimed_at < now() - p_stuck_after),
        'stuck', (select coalesce(jsonb_agg(s order by s.claimed_at), '[]'::jsonb) from (
                    select l.rule, l.table_name, l.row_key, l.due_at, l.claimed_at, l.holder,
                           l.attempts
                      from public.listener_ledger l
                     where l.state = 'claimed' and l.claimed_at < now() - p_stuck_after
                     order by l.claimed_at limit p_sample) s),
        'failures', (select coalesce(jsonb_agg(f order by f.failed desc, f.rule), '[]'::jsonb) from (
                    select l.rule, l.table_name, count(*) as failed,
                           max(coalesce(l.completed_at, l.fired_at, l.claimed_at)) as last_at,
                           (array_agg(l.detail->>'why' order by coalesce(l.completed_at,
                                l.fired_at, l.claimed_at) desc))[1] as last_why,
                           (array_agg(l.row_key order by coalesce(l.completed_at,
                                l.fired_at, l.claimed_at) desc))[1:5] as sample_keys
                      from public.listener_ledger l
                     where l.state = 'failed'
                       and coalesce(l.completed_at, l.fired_at, l.claimed_at) >= now() - p_window
                     group by l.rule, l.table_name) f),
        'lateness_ms', (select jsonb_build_object(
                    'count', count(*),
                    'p50', percentile_cont(0.5) within group (order by l.lateness_ms),
                    'p99', percentile_cont(0.99) within group (order by l.lateness_ms),
                    'max', max(l.lateness_ms))
                      from public.listener_ledger l
                     where l.fired_at >= now() - p_window and l.lateness_ms is not null),
        'lease', (select to_jsonb(x) from (
                    select holder, fencing_token, expires_at, renewed_at,
                           holder is not null and expires_at > now() as held
                      from public.listener_lease where name = 'listener') x));
end
$$;

-- Values of public.<p_table>.<p_column> outside p_known, with how many rows
-- hold each (most first, at most p_limit), among rows whose p_status_column
-- is in p_statuses when both are given. A missing table or column: no rows.
create or replace function public.listener_audit_values_v1(
    p_table text, p_column text, p_known text[], p_status_column text default null,
    p_statuses text[] default null, p_limit integer default 20)
returns table (value text, rows bigint)
language plpgsql
stable
security definer
set search_path = pg_catalog, pg_temp
set statement_timeout = '60s'
as $$
declare
    v_types jsonb := public.listener_table_columns_v2(p_table);
begin
    if v_types is null or not v_types ? p_column
       or (p_status_column is not null and not v_types ? p_status_column) then
        return;
    end if;
    return query execute format(
        'select t.%1$I::text, count(*) from public.%2$I t
          where t.%1$I is not null and not (t.%1$I::text = any($1)) %3$s
          group by 1 order by 2 desc, 1 limit $3',
        p_column, p_table,
        case when p_status_column is not null and p_statuses is not null
             then format('and t.%I::text = any($2)', p_status_column) else '' end)
        using coalesce(p_known, '{}'), p_statuses, p_limit;
end
$$;

-- Only the owner and service_role may call these.
select public.listener_restrict_functions_v1('listener\_audit\_%');
