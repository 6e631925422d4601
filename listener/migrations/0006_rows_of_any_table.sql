-- Rules over any table. The ledger is keyed by (rule, table, row key, due
-- instant); every read and write takes the table's query (the JSON the rules
-- derive: key, status, columns, conditions) instead of knowing sessions.
-- Table and column names only ever reach SQL through format('%I') after they
-- were found in the catalogue; values through parameters or format('%L').
-- Idempotent: safe to run more than once.

-- ---------------------------------------------------------------- ledger v2

alter table public.listener_ledger add column if not exists table_name text;
alter table public.listener_ledger add column if not exists row_key text;
alter table public.listener_ledger add column if not exists batch_key text;

-- Release-1 rows were all sessions: they keep every value, keyed as before.
update public.listener_ledger
   set table_name = 'sessions', row_key = session_id::text
 where table_name is null or row_key is null;

alter table public.listener_ledger alter column table_name set not null;
alter table public.listener_ledger alter column row_key set not null;
do $$
declare
    current_key text;
begin
    select string_agg(a.attname, ',' order by k.ord) into current_key
      from pg_constraint c
      cross join lateral unnest(c.conkey) with ordinality as k(attnum, ord)
      join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum
     where c.conrelid = 'public.listener_ledger'::regclass and c.contype = 'p';
    if current_key is distinct from 'rule,table_name,row_key,due_at' then
        if current_key is not null then
            execute (select format('alter table public.listener_ledger drop constraint %I', conname)
                       from pg_constraint
                      where conrelid = 'public.listener_ledger'::regclass and contype = 'p');
        end if;
        alter table public.listener_ledger
            add constraint listener_ledger_pkey primary key (rule, table_name, row_key, due_at);
    end if;
end
$$;

-- Set for rows of sessions only (the app's admin pages join on it).
alter table public.listener_ledger alter column session_id drop not null;

-- A row's history (the app's admin pages also join sessions on session_id,
-- served by listener_ledger_by_session from release 1); reports by fired_at.
create index if not exists listener_ledger_by_row
    on public.listener_ledger (table_name, row_key, due_at desc);
create index if not exists listener_ledger_by_fired_at
    on public.listener_ledger (fired_at);

-- ---------------------------------------------------------------- registry

-- The tables whose change objects (triggers, columns, publication) are
-- installed, with the query they were installed for.
create table if not exists public.listener_watched (
    table_name    text        primary key,
    query         jsonb       not null,
    checksum      text        not null,
    installed_at  timestamptz not null default now()
);
alter table public.listener_watched enable row level security;

-- ---------------------------------------------------------------- release 1 goes

-- Watching a table (listener_watch_v1) installs generic triggers instead of
-- these session-only ones; every function the v2 functions replace goes too,
-- whatever its signature.
drop trigger if exists listener_stamp_status_change on public.sessions;
drop trigger if exists listener_notify_session_change on public.sessions;

do $$
declare
    fn text;
begin
    for fn in
        select p.oid::regprocedure::text
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public'
           and p.proname in ('listener_fire', 'listener_complete', 'listener_tracked_sessions',
                             'listener_read_session', 'listener_session_contacts',
                             'listener_unfinished_claims', 'listener_session_json',
                             'listener_rule_json', 'listener_claim', 'listener_transition',
                             'listener_stamp_status_change', 'listener_notify_session_change')
    loop
        execute format('drop function %s', fn);
    end loop;
end
$$;

-- ---------------------------------------------------------------- catalogue helpers

-- Column name -> type of public.<p_table>; null when there is no such table.
create or replace function public.listener_table_columns_v2(p_table text)
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod))
      from pg_attribute a
     where a.attrelid = to_regclass(format('public.%I', p_table))
       and a.attnum > 0 and not a.attisdropped
$$;

-- The SQL type of a column that must exist, else an error naming it.
create or replace function public.listener_column_type_v2(p_columns jsonb, p_table text,
                                                          p_column text)
returns text
language plpgsql
immutable
set search_path = public, pg_temp
as $$
begin
    if p_columns is null then
        raise exception using errcode = '42P01',
            message = format('listener: table public.%I does not exist', p_table),
            hint = 'the rules for this table are inactive until it exists';
    end if;
    if p_column is null or not p_columns ? p_column then
        raise exception using errcode = '42703',
            message = format('listener: column %I of table public.%I does not exist',
                             p_column, p_table);
    end if;
    return p_columns ->> p_column;
end
$$;

-- SQL for the JSON object of a row: the listed columns that exist (a rule
-- naming a missing column is inactive, never an error here) plus "_version",
-- the row's xmin as text.
create or replace function public.listener_row_sql_v2(p_columns jsonb, p_wanted jsonb,
                                                      p_alias text)
returns text
language plpgsql
immutable
set search_path = public, pg_temp
as $$
declare
    pairs text[] := '{}';
    parts text[] := '{}';
    col text;
begin
    for col in select distinct on (c) c from jsonb_array_elements_text(p_wanted) c loop
        if p_columns ? col then
            pairs := pairs || format('%L, %I.%I', col, p_alias, col);
            -- jsonb_build_object takes at most 100 arguments.
            if cardinality(pairs) = 45 then
                parts := parts || format('jsonb_build_object(%s)', array_to_string(pairs, ', '));
                pairs := '{}';
            end if;
        end if;
    end loop;
    parts := parts || format('jsonb_build_object(%s)', array_to_string(
        pairs || format('''_version'', %I.xmin::text', p_alias), ', '));
    return array_to_string(parts, ' || ');
end
$$;

-- SQL for one anchor instant of a row aliased p_alias, or null when the anchor
-- cannot be computed here (a column that does not exist, or is not a time).
-- A derived anchor is start + map[column] * unit + sum(child column) * unit:
-- null when the start is null or the map lacks the value.
create or replace function public.listener_anchor_sql_v2(p_columns jsonb, p_table text,
                                                         p_key text, p_anchor jsonb,
                                                         p_alias text)
returns text
language plpgsql
stable
set search_path = public, pg_temp
as $$
declare
    col text;
    typ text;
    derived jsonb := p_anchor -> 'derived';
    term jsonb;
    terms text[] := '{}';
    child_columns jsonb;
    n integer := 0;
    sub text;
begin
    col := coalesce(p_anchor ->> 'column', derived ->> 'start');
    typ := p_columns ->> col;
    if typ is null then
        return null;
    elsif typ = 'timestamp with time zone' then
        sub := format('%I.%I', p_alias, col);
    elsif typ in ('timestamp without time zone', 'date') then
        -- Read as UTC: every function interpreting rows runs with TimeZone UTC.
        sub := format('%I.%I::timestamptz', p_alias, col);
    else
        return null;
    end if;
    if derived is null then
        return sub;
    end if;
    for term in select * from jsonb_array_elements(coalesce(derived -> 'lookups', '[]')) loop
        if not p_columns ? (term ->> 'column') then
            return null;
        end if;
        terms := terms || format('(%L::jsonb ->> %I.%I::text)::float8 * %s',
                                 coalesce(term -> 'map', '{}'), p_alias, term ->> 'column',
                                 (term ->> 'unit_us')::bigint);
    end loop;
    for term in select * from jsonb_array_elements(coalesce(derived -> 'sums', '[]')) loop
        n := n + 1;
        child_columns := public.listener_table_columns_v2(term ->> 'table');
        -- No child table (or column) means no child rows: the sum is zero.
        continue when child_columns is null
                   or not child_columns ? (term ->> 'column')
                   or not child_columns ? (term ->> 'by');
        terms := terms || format(
            'coalesce((select sum(%2$I.%3$I) from public.%4$I %2$I where %5$s), 0)::float8 * %6$s',
            null, p_alias || '_sum' || n, term ->> 'column', term ->> 'table',
            case when child_columns ->> (term ->> 'by') = p_columns ->> p_key
                 then format('%I.%I = %I.%I', p_alias || '_sum' || n, term ->> 'by', p_alias, p_key)
                 else format('%I.%I::text = %I.%I::text', p_alias || '_sum' || n, term ->> 'by',
                             p_alias, p_key) end,
            (term ->> 'unit_us')::bigint);
    end loop;
    if cardinality(terms) = 0 then
        return sub;
    end if;
    return format('(%s + (%s) * interval ''1 microsecond'')', sub, array_to_string(terms, ' + '));
end
$$;

-- SQL for "the row owes some rule an action": any condition holds. A
-- condition: status among its statuses (any when none are listed), present
-- columns non-null, absent ones null, some anchor computable, and with a
-- horizon the latest anchor no older than now() - horizon. A condition naming a
-- column the table lacks never holds.
create or replace function public.listener_condition_sql_v2(p_columns jsonb, p_query jsonb,
                                                            p_alias text)
returns text
language plpgsql
stable
set search_path = public, pg_temp
as $$
declare
    tbl text := p_query ->> 'table';
    key text := p_query ->> 'key';
    status text := p_query ->> 'status';
    cond jsonb;
    anchor jsonb;
    parts text[];
    anchors text[];
    alternatives text[] := '{}';
    col text;
    expr text;
    usable boolean;
begin
    for cond in select * from jsonb_array_elements(coalesce(p_query -> 'conditions', '[]')) loop
        parts := '{}';
        anchors := '{}';
        usable := true;
        if jsonb_array_length(coalesce(cond -> 'statuses', '[]')) > 0 then
            if status is null or not p_columns ? status then
                usable := false;
            else
                parts := parts || format('%I.%I::text = any (%L::text[])', p_alias, status,
                    (select array_agg(s) from jsonb_array_elements_text(cond -> 'statuses') s));
            end if;
        end if;
        for col in select * from jsonb_array_elements_text(coalesce(cond -> 'present', '[]')) loop
            usable := usable and p_columns ? col;
            parts := parts || format('%I.%I is not null', p_alias, col);
        end loop;
        for col in select * from jsonb_array_elements_text(coalesce(cond -> 'absent', '[]')) loop
            usable := usable and p_columns ? col;
            parts := parts || format('%I.%I is null', p_alias, col);
        end loop;
        for anchor in select * from jsonb_array_elements(coalesce(cond -> 'anchors', '[]')) loop
            expr := public.listener_anchor_sql_v2(p_columns, tbl, key, anchor, p_alias);
            if expr is null then
                usable := false;
            else
                anchors := anchors || expr;
            end if;
        end loop;
        continue when not usable or cardinality(anchors) = 0;
        parts := parts || format('(%s)', array_to_string(
            array(select a || ' is not null' from unnest(anchors) a), ' or '));
        if jsonb_typeof(cond -> 'horizon_us') = 'number' then
            parts := parts || format(
                'greatest(%s) >= now() - %s * interval ''1 microsecond''',
                array_to_string(anchors, ', '), (cond ->> 'horizon_us')::bigint);
        end if;
        alternatives := alternatives || format('(%s)', array_to_string(parts, ' and '));
    end loop;
    if cardinality(alternatives) = 0 then
        return 'false';
    end if;
    return array_to_string(alternatives, ' or ');
end
$$;

-- SQL for "the row is tracked": its conditions, or for a child table (read only
-- for a parent's sums) "its `by` is the key of a tracked parent row". The
-- parent's query travels inside the child's: {"parent": {"table", "by", "query"}}.
create or replace function public.listener_tracked_sql_v2(p_columns jsonb, p_query jsonb,
                                                          p_alias text)
returns text
language plpgsql
stable
set search_path = public, pg_temp
as $$
declare
    parent jsonb := p_query -> 'parent';
    parent_query jsonb;
    parent_columns jsonb;
    parent_alias text := p_alias || '_parent';
begin
    if jsonb_typeof(parent) is distinct from 'object' then
        return public.listener_condition_sql_v2(p_columns, p_query, p_alias);
    end if;
    parent_query := parent -> 'query';
    parent_columns := public.listener_table_columns_v2(parent ->> 'table');
    if parent_query is null or parent_columns is null or not p_columns ? (parent ->> 'by')
       or not parent_columns ? (parent_query ->> 'key') then
        return 'false';
    end if;
    return format('exists (select 1 from public.%I %I where %s and (%s))',
        parent ->> 'table', parent_alias,
        case when parent_columns ->> (parent_query ->> 'key') = p_columns ->> (parent ->> 'by')
             then format('%I.%I = %I.%I', parent_alias, parent_query ->> 'key', p_alias,
                         parent ->> 'by')
             else format('%I.%I::text = %I.%I::text', parent_alias, parent_query ->> 'key',
                         p_alias, parent ->> 'by') end,
        public.listener_condition_sql_v2(parent_columns, parent_query, parent_alias));
end
$$;

-- ---------------------------------------------------------------- reads

-- One page of the rows the rules track, as one JSON array (a row with an
-- extreme timestamp is one odd value, never a failed page). Keyset by key,
-- compared in the key's own type so the primary-key index serves it.
create or replace function public.listener_tracked_rows_v2(p_query jsonb, p_after text default null,
                                                           p_limit integer default 1000)
returns jsonb
language plpgsql
stable
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    tbl text := p_query ->> 'table';
    key text := p_query ->> 'key';
    columns jsonb := public.listener_table_columns_v2(tbl);
    key_type text := public.listener_column_type_v2(columns, tbl, key);
    result jsonb;
begin
    execute format(
        'select coalesce(jsonb_agg(page.j order by page.k), ''[]''::jsonb) from ('
        'select t.%1$I as k, %2$s as j from public.%3$I t where (%4$s) %5$s '
        'order by t.%1$I limit %6$s) page',
        key, public.listener_row_sql_v2(columns, p_query -> 'columns', 't'), tbl,
        public.listener_tracked_sql_v2(columns, p_query, 't'),
        case when p_after is null then '' else format('and t.%I > $1::%s', key, key_type) end,
        greatest(1, least(coalesce(p_limit, 1000), 50000)))
    into result using p_after;
    return result;
end
$$;

-- The row now (the query's columns and "_version"), or null.
create or replace function public.listener_read_row_v2(p_query jsonb, p_key text)
returns jsonb
language plpgsql
stable
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    tbl text := p_query ->> 'table';
    key text := p_query ->> 'key';
    columns jsonb := public.listener_table_columns_v2(tbl);
    key_type text := public.listener_column_type_v2(columns, tbl, key);
    result jsonb;
begin
    execute format('select %s from public.%I t where t.%I = $1::%s',
                   public.listener_row_sql_v2(columns, p_query -> 'columns', 't'), tbl, key,
                   key_type)
    into result using p_key;
    return result;
end
$$;

-- The incremental read: rows written at or after p_since (by the
-- listener_changed_at column its watch keeps), oldest first, at most p_limit,
-- each with "_changed_at". Every changed row, tracked or not: a row that left
-- its rules must be seen too. An index range scan, bounded by p_limit.
create or replace function public.listener_changed_rows_v2(p_query jsonb, p_since timestamptz,
                                                           p_limit integer default 1000)
returns jsonb
language plpgsql
stable
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    tbl text := p_query ->> 'table';
    key text := p_query ->> 'key';
    columns jsonb := public.listener_table_columns_v2(tbl);
    key_type text := public.listener_column_type_v2(columns, tbl, key);
    result jsonb;
begin
    if not columns ? 'listener_changed_at' then
        raise exception using errcode = '42703',
            message = format('listener: public.%I is not watched (no listener_changed_at column)', tbl),
            hint = 'run listener migrate';
    end if;
    execute format(
        'select coalesce(jsonb_agg(page.j order by page.c, page.k), ''[]''::jsonb) from ('
        'select t.listener_changed_at as c, t.%1$I as k, '
        '%2$s || jsonb_build_object(''_changed_at'', t.listener_changed_at) as j '
        'from public.%3$I t where t.listener_changed_at >= $1 '
        'order by t.listener_changed_at, t.%1$I limit %4$s) page',
        key, public.listener_row_sql_v2(columns, p_query -> 'columns', 't'), tbl,
        greatest(1, least(coalesce(p_limit, 1000), 50000)))
    into result using p_since;
    return result;
end
$$;

-- ---------------------------------------------------------------- actions

-- Insert one timeline row {"table", "row"} (only the keys that are columns, so
-- the table's defaults fill the rest). The timeline is the app's record, not
-- the action: a table that does not exist is skipped, and a row it refuses
-- comes back as the error text (kept in the ledger detail) instead of undoing
-- the action.
create or replace function public.listener_insert_timeline_v2(p_timeline jsonb)
returns text
language plpgsql
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    tbl text := p_timeline ->> 'table';
    columns jsonb := public.listener_table_columns_v2(tbl);
    names text;
begin
    if columns is null or jsonb_typeof(p_timeline -> 'row') is distinct from 'object' then
        return null;
    end if;
    select string_agg(format('%I', k), ', ') into names
      from jsonb_object_keys(p_timeline -> 'row') k where columns ? k;
    if names is null then
        return null;
    end if;
    begin
        execute format('insert into public.%1$I (%2$s) select %2$s '
                       'from jsonb_populate_record(null::public.%1$I, $1)', tbl, names)
        using p_timeline -> 'row';
    exception when others then
        return format('%s: %s', sqlstate, sqlerrm);
    end;
    return null;
end
$$;

-- Act on a due episode (rule, table, key, due) in one transaction:
--  1. with p_version: the row must still be at that version (the state the
--     daemon decided on), else 'stale' with the row as it is now, and nothing
--     is claimed: the daemon re-checks its rule against it;
--  2. claim it in the ledger: 'done' if it already happened; a claim left
--     unfinished by a crashed or replaced holder is taken over;
--  3. with p_status or p_set: compare-and-set (the status must be one of
--     p_expected): the status, metadata.listener merged where the table has a
--     jsonb metadata column (every other key kept), ended_at on 'completed' and
--     cancelled_at on 'cancelled' where those columns exist, status_changed_at
--     = p_fired_at when the status changes, and the columns of p_set that
--     exist (others ignored); 'conflict' with the row when the status moved on
--     (the claim stays for the daemon to record as skipped);
--  4. with p_finish: complete the claim with that outcome, and insert
--     p_timeline ({"table", "row"}).
-- 'fenced' when (p_holder, p_token) no longer holds the lease; 'missing' when
-- the row is gone and a row check was asked for.
create or replace function public.listener_fire_v2(
    p_table text, p_key_column text, p_status_column text, p_columns text[],
    p_rule text, p_key text, p_due_at timestamptz,
    p_holder text, p_token bigint, p_fired_at timestamptz,
    p_version text default null, p_expected text[] default null,
    p_status text default null, p_reason text default null, p_set jsonb default null,
    p_finish text default null, p_lateness_ms bigint default null,
    p_detail jsonb default '{}'::jsonb, p_timeline jsonb default null)
returns jsonb
language plpgsql
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    columns jsonb;
    key_type text;
    status_type text;
    row_sql text;
    row_json jsonb;
    row_version text;
    row_status text;
    entry public.listener_ledger;
    applied boolean := false;
    attempts integer := 1;
    changes boolean := p_status is not null or p_set is not null;
    sets text[] := '{}';
    col text;
    timeline_error text;
    final_detail jsonb := coalesce(p_detail, '{}'::jsonb);
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return jsonb_build_object('outcome', 'fenced');
    end if;
    if p_version is not null or changes then
        columns := public.listener_table_columns_v2(p_table);
        key_type := public.listener_column_type_v2(columns, p_table, p_key_column);
        row_sql := public.listener_row_sql_v2(columns, to_jsonb(coalesce(p_columns, '{}')), 't');
        if changes then
            status_type := public.listener_column_type_v2(columns, p_table, p_status_column);
        end if;
        execute format('select t.xmin::text, %s, %s from public.%I t where t.%I = $1::%s for update',
                       case when p_status_column is not null and columns ? p_status_column
                            then format('t.%I::text', p_status_column) else 'null::text' end,
                       row_sql, p_table, p_key_column, key_type)
        into row_version, row_status, row_json using p_key;
        if row_version is null then
            return jsonb_build_object('outcome', 'missing');
        end if;
        if p_version is not null and row_version <> p_version then
            return jsonb_build_object('outcome', 'stale', 'row', row_json);
        end if;
    end if;
    insert into public.listener_ledger (rule, table_name, row_key, session_id, due_at, holder,
                                        fencing_token, fired_at)
    values (p_rule, p_table, p_key,
            case when p_table = 'sessions'
                  and p_key ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                 then p_key::uuid end,
            p_due_at, p_holder, p_token, p_fired_at)
    on conflict do nothing;
    if not found then
        select * into entry from public.listener_ledger l
         where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
           and l.due_at = p_due_at
           for update;
        if entry.state <> 'claimed' then
            return jsonb_build_object('outcome', 'done');
        end if;
        update public.listener_ledger l
           set holder = p_holder, fencing_token = p_token, attempts = l.attempts + 1
         where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
           and l.due_at = p_due_at
        returning * into entry;
        applied := entry.status_applied;
        attempts := entry.attempts;
    end if;
    if changes and not applied then
        if p_expected is not null and not coalesce(row_status = any (p_expected), false) then
            return jsonb_build_object('outcome', 'conflict', 'attempts', attempts, 'row', row_json);
        end if;
        if p_status is not null then
            sets := sets || format('%I = $1::%s', p_status_column, status_type);
            if columns ->> 'metadata' = 'jsonb' then
                sets := sets || 'metadata = coalesce(x.metadata, ''{}''::jsonb) || jsonb_build_object('
                                '''listener'', jsonb_build_object(''reason'', $2, ''rule'', $3, '
                                '''at'', $4))'::text;
            end if;
            if p_status = 'completed' and columns ? 'ended_at' then
                sets := sets || 'ended_at = coalesce(x.ended_at, $4)'::text;
            end if;
            if p_status = 'cancelled' and columns ? 'cancelled_at' then
                sets := sets || 'cancelled_at = coalesce(x.cancelled_at, $4)'::text;
            end if;
            if columns ? 'status_changed_at' then
                sets := sets || format('status_changed_at = case when x.%I::text is distinct '
                                       'from $1 then $4 else x.status_changed_at end',
                                       p_status_column);
            end if;
        end if;
        if jsonb_typeof(p_set) = 'object' then
            for col in select k from jsonb_object_keys(p_set) k loop
                continue when not columns ? col
                           or col in (p_key_column, p_status_column, 'metadata');
                sets := sets || format('%1$I = (jsonb_populate_record(null::public.%2$I, $5)).%1$I',
                                       col, p_table);
            end loop;
        end if;
        if cardinality(sets) > 0 then
            if columns ? 'updated_at' then
                sets := sets || 'updated_at = now()'::text;
            end if;
            execute format('update public.%I x set %s where x.%I = $6::%s '
                           'returning x.xmin::text, %s',
                           p_table, array_to_string(sets, ', '), p_key_column, key_type,
                           public.listener_row_sql_v2(columns, to_jsonb(coalesce(p_columns, '{}')),
                                                      'x'))
            into row_version, row_json
            using p_status, p_reason, p_rule, p_fired_at, p_set, p_key;
        end if;
        update public.listener_ledger l set status_applied = true
         where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
           and l.due_at = p_due_at;
        applied := true;
    end if;
    if p_finish is not null then
        if p_timeline is not null then
            timeline_error := public.listener_insert_timeline_v2(p_timeline);
            if timeline_error is not null then
                final_detail := final_detail || jsonb_build_object('timeline_error', timeline_error);
            end if;
        end if;
        update public.listener_ledger l
           set state = p_finish, fired_at = p_fired_at, lateness_ms = p_lateness_ms,
               detail = final_detail, completed_at = clock_timestamp()
         where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
           and l.due_at = p_due_at;
    end if;
    return jsonb_build_object('outcome', 'claimed', 'status_applied', applied,
                              'attempts', attempts, 'row', row_json);
end
$$;

-- Finish a claim with its outcome (and write its timeline row). False when
-- fenced or not ours.
create or replace function public.listener_complete_v2(
    p_rule text, p_table text, p_key text, p_due_at timestamptz,
    p_holder text, p_token bigint, p_outcome text, p_fired_at timestamptz,
    p_lateness_ms bigint, p_detail jsonb default '{}'::jsonb, p_timeline jsonb default null)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    final_detail jsonb := coalesce(p_detail, '{}'::jsonb);
    timeline_error text;
begin
    if not public.listener_fence_ok(p_holder, p_token) then
        return false;
    end if;
    perform 1 from public.listener_ledger l
     where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
       and l.due_at = p_due_at and l.state = 'claimed' and l.holder = p_holder
       and l.fencing_token = p_token
       for update;
    if not found then
        return false;
    end if;
    if p_timeline is not null then
        timeline_error := public.listener_insert_timeline_v2(p_timeline);
        if timeline_error is not null then
            final_detail := final_detail || jsonb_build_object('timeline_error', timeline_error);
        end if;
    end if;
    update public.listener_ledger l
       set state = p_outcome, fired_at = p_fired_at, lateness_ms = p_lateness_ms,
           detail = final_detail, completed_at = clock_timestamp()
     where l.rule = p_rule and l.table_name = p_table and l.row_key = p_key
       and l.due_at = p_due_at;
    return true;
end
$$;

-- Claims a crash or a lost lease left unfinished, older than p_older_than,
-- oldest first: one JSON array.
create or replace function public.listener_unfinished_claims_v2(p_older_than interval default '0')
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
    select coalesce(jsonb_agg(c.j order by c.claimed_at), '[]'::jsonb)
      from (select l.claimed_at,
                   jsonb_build_object('rule', l.rule, 'table_name', l.table_name,
                                      'row_key', l.row_key, 'due_at', l.due_at,
                                      'status_applied', l.status_applied,
                                      'attempts', l.attempts, 'fired_at', l.fired_at,
                                      'batch_key', l.batch_key) as j
              from public.listener_ledger l
             where l.state = 'claimed' and l.claimed_at <= clock_timestamp() - p_older_than
             order by l.claimed_at
             limit 1000) c
$$;

-- Who to email about a row. p_recipients: {"role": [{"kind": "user"|"mechanic",
-- "column": "..."}]}, sources in order; the first whose column holds a value
-- that resolves to an email wins (else the first with a value, email null).
-- user: auth.users.email and profiles.full_name by id; mechanic:
-- public.mechanics email and name by id. A source whose column does not exist
-- is skipped; a role with no value in any source is left out. SECURITY
-- DEFINER: auth.users is not readable by the API roles.
create or replace function public.listener_contacts_v2(p_table text, p_key_column text,
                                                       p_key text, p_recipients jsonb)
returns jsonb
language plpgsql
stable
security definer
set search_path = public, pg_temp
as $$
declare
    columns jsonb := public.listener_table_columns_v2(p_table);
    key_type text := public.listener_column_type_v2(columns, p_table, p_key_column);
    doc jsonb;
    role text;
    sources jsonb;
    source jsonb;
    value text;
    contact jsonb;
    chosen jsonb;
    result jsonb := '{}'::jsonb;
    uuid_text constant text := '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
begin
    execute format('select to_jsonb(t) from public.%I t where t.%I = $1::%s',
                   p_table, p_key_column, key_type)
    into doc using p_key;
    if doc is null then
        return result;
    end if;
    for role, sources in select * from jsonb_each(coalesce(p_recipients, '{}'::jsonb)) loop
        chosen := null;
        for source in select * from jsonb_array_elements(
                case when jsonb_typeof(sources) = 'array' then sources else '[]'::jsonb end) loop
            continue when not doc ? (source ->> 'column');
            value := doc ->> (source ->> 'column');
            continue when value is null;
            contact := jsonb_build_object('email', null, 'name', null);
            if value ~* uuid_text then
                if source ->> 'kind' = 'user' then
                    if to_regclass('auth.users') is not null then
                        contact := contact || jsonb_build_object('email',
                            (select u.email from auth.users u where u.id = value::uuid));
                    end if;
                    if to_regclass('public.profiles') is not null then
                        contact := contact || jsonb_build_object('name',
                            (select p.full_name from public.profiles p where p.id = value::uuid));
                    end if;
                elsif source ->> 'kind' = 'mechanic' and to_regclass('public.mechanics') is not null then
                    select jsonb_build_object('email', m.email, 'name', m.name) into contact
                      from public.mechanics m where m.id = value::uuid;
                    contact := coalesce(contact, jsonb_build_object('email', null, 'name', null));
                end if;
            end if;
            if chosen is null or (chosen ->> 'email' is null and contact ->> 'email' is not null) then
                chosen := contact;
            end if;
            exit when chosen ->> 'email' is not null;
        end loop;
        if chosen is not null then
            result := result || jsonb_build_object(role, chosen);
        end if;
    end loop;
    return result;
end
$$;

-- What start-up needs to know of each table: whether it exists, its primary
-- key, its columns with their types, and per column the CHECK constraints that
-- mention it (a rule writing a status the constraint rejects is inactive).
create or replace function public.listener_describe_v1(p_tables text[])
returns jsonb
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select coalesce(jsonb_object_agg(t.name, case when t.oid is null then
               jsonb_build_object('exists', false, 'primary_key', '[]'::jsonb,
                                  'columns', '{}'::jsonb, 'checks', '{}'::jsonb)
           else jsonb_build_object(
               'exists', true,
               'primary_key', coalesce((
                   select jsonb_agg(a.attname order by k.ord)
                     from pg_constraint c
                     cross join lateral unnest(c.conkey) with ordinality as k(attnum, ord)
                     join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum
                    where c.conrelid = t.oid and c.contype = 'p'), '[]'::jsonb),
               'columns', coalesce((
                   select jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod))
                     from pg_attribute a
                    where a.attrelid = t.oid and a.attnum > 0 and not a.attisdropped),
                   '{}'::jsonb),
               'checks', coalesce((
                   select jsonb_object_agg(per.attname, per.defs)
                     from (select a.attname,
                                  jsonb_agg(pg_get_constraintdef(c.oid) order by c.conname) as defs
                             from pg_constraint c
                             join pg_attribute a on a.attrelid = c.conrelid
                                                and a.attnum = any (c.conkey)
                            where c.conrelid = t.oid and c.contype = 'c'
                            group by a.attname) per), '{}'::jsonb))
           end), '{}'::jsonb)
      from (select name, to_regclass(format('public.%I', name)) as oid
              from unnest(p_tables) as name) t
$$;

-- ---------------------------------------------------------------- watching a table

-- BEFORE trigger: status_changed_at follows the status column named by the
-- trigger's argument (the instant the row entered its current status). A
-- writer that sets the column itself (the listener when it fires, a backfill)
-- is trusted.
create or replace function public.listener_stamp_status_v1()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        new.status_changed_at := coalesce(new.status_changed_at, now());
    elsif (to_jsonb(new) -> tg_argv[0]) is distinct from (to_jsonb(old) -> tg_argv[0]) then
        if new.status_changed_at is not distinct from old.status_changed_at then
            new.status_changed_at := now();
        end if;
    elsif new.status_changed_at is null then
        new.status_changed_at := old.status_changed_at;
    end if;
    return new;
end
$$;

-- BEFORE trigger: the instant each row was last written, for the incremental
-- read. clock_timestamp(), not now(): rows written late in a long transaction
-- get a late stamp, and the reader's overlap covers the commit delay.
create or replace function public.listener_stamp_changed_at_v1()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
    new.listener_changed_at := clock_timestamp();
    return new;
end
$$;

-- AFTER trigger: one NOTIFY on channel listener_changes per row change, with
-- the columns the rules read (trigger arguments: the key column, the columns
-- as a JSON array) and "_version", this transaction's id (the new row's xmin),
-- so the daemon can act on it without reading the row again. DELETE carries
-- the key alone. NOTIFY payloads are limited to 8000 bytes: an oversized one
-- carries the key alone and the daemon reads the row.
create or replace function public.listener_notify_change_v1()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
set timezone = 'UTC'
as $$
declare
    key_column text := tg_argv[0];
    doc jsonb;
    payload text;
begin
    if tg_op = 'DELETE' then
        doc := to_jsonb(old);
        payload := jsonb_build_object('type', tg_op, 'table', tg_table_name,
            'old_record', jsonb_build_object(key_column, doc -> key_column))::text;
    else
        doc := to_jsonb(new);
        payload := jsonb_build_object('type', tg_op, 'table', tg_table_name,
            'record', coalesce((select jsonb_object_agg(c, doc -> c)
                                  from jsonb_array_elements_text(tg_argv[1]::jsonb) c
                                 where doc ? c), '{}'::jsonb)
                      || jsonb_build_object('_version', pg_current_xact_id()::xid::text))::text;
    end if;
    if octet_length(payload) > 7900 then
        payload := jsonb_build_object('type', tg_op, 'table', tg_table_name,
                                      'key', doc ->> key_column, 'truncated', true)::text;
    end if;
    perform pg_notify('listener_changes', payload);
    return null;
end
$$;

-- What identifies an installed watch: the parts of the query the objects
-- depend on (not offsets or maps, which change nothing in the database).
create or replace function public.listener_watch_checksum_v1(p_query jsonb)
returns text
language sql
immutable
set search_path = public, pg_temp
as $$
    select md5(jsonb_build_object(
        'table', p_query -> 'table', 'key', p_query -> 'key', 'status', p_query -> 'status',
        'columns', p_query -> 'columns',
        'stamps_status', coalesce(p_query -> 'stamps_status', 'false'::jsonb))::text)
$$;

-- Whether the table's watch is installed for this query (null when the table
-- does not exist): what `listener migrate` and `listener run` check.
create or replace function public.listener_watch_current_v1(p_query jsonb)
returns boolean
language sql
stable
security definer
set search_path = public, pg_temp
as $$
    select case when to_regclass(format('public.%I', p_query ->> 'table')) is null then null
           else exists (select 1 from public.listener_watched w
                         where w.table_name = p_query ->> 'table'
                           and w.checksum = public.listener_watch_checksum_v1(p_query))
                and exists (select 1 from pg_trigger g
                             where g.tgrelid = to_regclass(format('public.%I', p_query ->> 'table'))
                               and g.tgname = 'listener_notify_change')
           end
$$;

-- Install the objects one watched table needs, idempotently: status_changed_at
-- and its trigger (when a rule anchors on it: "stamps_status"), the
-- listener_changed_at column with its trigger and index (the incremental
-- read), the NOTIFY trigger, membership of the supabase_realtime publication
-- where it exists, and a row in listener_watched. A table that does not exist
-- is skipped with a NOTICE (its rules are inactive there): false.
create or replace function public.listener_watch_v1(p_query jsonb)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    tbl text := p_query ->> 'table';
    key text := p_query ->> 'key';
    status text := p_query ->> 'status';
    stamps boolean := coalesce((p_query ->> 'stamps_status')::boolean, false);
    columns jsonb := public.listener_table_columns_v2(tbl);
    wanted_checksum text := public.listener_watch_checksum_v1(p_query);
    watched jsonb;
    backfill text[] := '{}';
    index_name text := left(tbl, 30) || '_listener_changed_at_' || left(md5(tbl), 8);
begin
    if columns is null then
        raise notice 'listener: table public.% does not exist: its rules are inactive here', tbl;
        return false;
    end if;
    if key is null or not columns ? key then
        raise notice 'listener: table public.% has no key column %: its rules are inactive here',
            tbl, key;
        return false;
    end if;
    -- Up to date (same query, triggers in place): touch nothing, take no lock.
    if public.listener_watch_current_v1(p_query) then
        return true;
    end if;

    if stamps and status is not null and columns ? status then
        if not columns ? 'status_changed_at' then
            execute format('alter table public.%I add column status_changed_at timestamptz', tbl);
            -- The best instant the table already knows.
            if columns ? 'updated_at' then backfill := backfill || 'updated_at'::text; end if;
            if columns ? 'created_at' then backfill := backfill || 'created_at'::text; end if;
            execute format('update public.%I set status_changed_at = coalesce(%s) '
                           'where status_changed_at is null', tbl,
                           array_to_string(array(select format('%I::timestamptz', c)
                                                   from unnest(backfill) c) || 'now()'::text, ', '));
        end if;
        execute format('alter table public.%I alter column status_changed_at set default now()', tbl);
        execute format('drop trigger if exists listener_stamp_status on public.%I', tbl);
        execute format('create trigger listener_stamp_status before insert or update of %I, '
                       'status_changed_at on public.%I for each row '
                       'execute function public.listener_stamp_status_v1(%L)', status, tbl, status);
    else
        execute format('drop trigger if exists listener_stamp_status on public.%I', tbl);
    end if;

    execute format('alter table public.%I add column if not exists listener_changed_at timestamptz',
                   tbl);
    execute format('create index if not exists %I on public.%I (listener_changed_at) '
                   'where listener_changed_at is not null', index_name, tbl);
    execute format('drop trigger if exists listener_stamp_changed_at on public.%I', tbl);
    execute format('create trigger listener_stamp_changed_at before insert or update '
                   'on public.%I for each row execute function public.listener_stamp_changed_at_v1()',
                   tbl);

    select coalesce(jsonb_agg(c), '[]'::jsonb) into watched
      from (select distinct on (c) c from jsonb_array_elements_text(
                coalesce(p_query -> 'columns', '[]'::jsonb) || to_jsonb(key)) c) cs
     where columns ? c or c = 'status_changed_at';
    execute format('drop trigger if exists listener_notify_change on public.%I', tbl);
    execute format('create trigger listener_notify_change after insert or update or delete '
                   'on public.%I for each row execute function public.listener_notify_change_v1(%L, %L)',
                   tbl, key, watched::text);

    if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
       and not exists (select 1 from pg_publication_tables
                        where pubname = 'supabase_realtime'
                          and schemaname = 'public' and tablename = tbl)
       and not (select puballtables from pg_publication where pubname = 'supabase_realtime')
    then
        execute format('alter publication supabase_realtime add table public.%I', tbl);
    end if;

    insert into public.listener_watched (table_name, query, checksum)
    values (tbl, p_query, wanted_checksum)
    on conflict (table_name) do update
       set query = excluded.query, checksum = excluded.checksum, installed_at = now();
    return true;
end
$$;

-- Remove the listener's triggers and index from a table and forget it. Its
-- columns stay (status_changed_at is data the app may read), and so does its
-- publication membership (the app may stream the table itself).
create or replace function public.listener_unwatch_v1(p_table text)
returns boolean
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    if to_regclass(format('public.%I', p_table)) is not null then
        execute format('drop trigger if exists listener_stamp_status on public.%I', p_table);
        execute format('drop trigger if exists listener_stamp_changed_at on public.%I', p_table);
        execute format('drop trigger if exists listener_notify_change on public.%I', p_table);
        execute format('drop index if exists public.%I',
                       left(p_table, 30) || '_listener_changed_at_' || left(md5(p_table), 8));
    end if;
    delete from public.listener_watched where table_name = p_table;
    return found;
end
$$;

-- ---------------------------------------------------------------- privileges

-- Functions are callable only by their owner and service_role: this revokes
-- what PostgreSQL (PUBLIC) and Supabase's default privileges (anon,
-- authenticated) grant, for every function of public whose name matches
-- p_like. Each migration calls it for the functions it creates.
create or replace function public.listener_restrict_functions_v1(p_like text)
returns void
language plpgsql
set search_path = public, pg_temp
as $$
declare
    fn text;
    api_role text;
begin
    for fn in
        select p.oid::regprocedure::text
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'public' and p.proname like p_like
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

-- Only the owner and service_role may call these, or read the registry:
-- revoke what PostgreSQL (PUBLIC) and Supabase's default privileges (anon,
-- authenticated) grant.
do $$
declare
    api_role text;
begin
    perform public.listener_restrict_functions_v1('listener\_%');
    foreach api_role in array array['anon', 'authenticated'] loop
        if exists (select 1 from pg_roles where rolname = api_role) then
            execute format('revoke all on public.listener_watched from %I', api_role);
        end if;
    end loop;
    if exists (select 1 from pg_roles where rolname = 'service_role') then
        grant select on public.listener_watched to service_role;
    end if;
end
$$;
