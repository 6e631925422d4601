-- Pages of rows as one JSON value {"columns": [names], "rows": [[values], ...]}
-- instead of an array of one jsonb object per row. Start-up and every full
-- sweep read every tracked row, and the incremental read every changed row
-- about twice: building a jsonb object per row (keys repeated in each, a tree
-- then printed as text) was three quarters of the sweep's time in the
-- database. A row here is a JSON array in the order of "columns", printed
-- straight to text. Which rows are read, their order and their keyset are
-- those of the v2 functions (the same condition SQL). Table and column names
-- only ever reach SQL through format('%I') after they were found in the
-- catalogue. Idempotent: safe to run more than once.

-- The columns of a page: the wanted ones the table has, once each, in name
-- order, then p_extra (the names of the computed values each row ends with).
create or replace function public.listener_page_columns_v3(p_columns jsonb, p_wanted jsonb,
                                                           p_extra text[])
returns text[]
language sql
immutable
set search_path = public, pg_temp
as $$
    select array(select distinct c from jsonb_array_elements_text(coalesce(p_wanted, '[]')) c
                  where p_columns ? c order by c) || p_extra
$$;

-- SQL for one row as JSON array text: the named columns of the row aliased
-- p_alias, then the p_values expressions. Built as text from an ARRAY of each
-- value's JSON (a SQL NULL is JSON null), so any number of columns fits (a
-- function call, like json_build_array, takes at most 100 arguments).
create or replace function public.listener_row_array_sql_v3(p_names text[], p_alias text,
                                                            p_values text[])
returns text
language sql
immutable
set search_path = public, pg_temp
as $$
    select format('(''['' || array_to_string(array[%s], '','') || '']'')',
                  array_to_string(array(
                      select format('coalesce(to_json(%s)::text, ''null'')', v)
                        from unnest(array(select format('%I.%I', p_alias, n) from unnest(p_names) n)
                                    || p_values) with ordinality as x(v, ord)
                       order by ord), ', '))
$$;

-- One page of the rows the rules track: {"columns", "rows"}, each row its
-- columns of the query and "_version" (its xmin as text). Keyset by key,
-- compared in the key's own type so the primary-key index serves it.
create or replace function public.listener_tracked_rows_v3(p_query jsonb, p_after text default null,
                                                           p_limit integer default 1000)
returns json
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
    names text[] := public.listener_page_columns_v3(columns, p_query -> 'columns',
                                                     array['_version']);
    result text;
begin
    execute format(
        'select coalesce(string_agg(page.j, '','' order by page.k), '''') from ('
        'select t.%1$I as k, %2$s as j from public.%3$I t where (%4$s) %5$s '
        'order by t.%1$I limit %6$s) page',
        key,
        public.listener_row_array_sql_v3(names[1:cardinality(names) - 1], 't',
                                         array['t.xmin::text']),
        tbl,
        public.listener_tracked_sql_v2(columns, p_query, 't'),
        case when p_after is null then '' else format('and t.%I > $1::%s', key, key_type) end,
        greatest(1, least(coalesce(p_limit, 1000), 50000)))
    into result using p_after;
    return format('{"columns": %s, "rows": [%s]}', to_json(names), result)::json;
end
$$;

-- The incremental read: rows written at or after p_since (by the
-- listener_changed_at column its watch keeps), oldest first, at most p_limit,
-- as {"columns", "rows"}: each row its columns of the query, "_version" and
-- "_changed_at". Every changed row, tracked or not: a row that left its rules
-- must be seen too. An index range scan, bounded by p_limit.
create or replace function public.listener_changed_rows_v3(p_query jsonb, p_since timestamptz,
                                                           p_limit integer default 1000)
returns json
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
    names text[] := public.listener_page_columns_v3(columns, p_query -> 'columns',
                                                     array['_version', '_changed_at']);
    result text;
begin
    if not columns ? 'listener_changed_at' then
        raise exception using errcode = '42703',
            message = format('listener: public.%I is not watched (no listener_changed_at column)', tbl),
            hint = 'run listener migrate';
    end if;
    execute format(
        'select coalesce(string_agg(page.j, '','' order by page.c, page.k), '''') from ('
        'select t.listener_changed_at as c, t.%1$I as k, %2$s as j '
        'from public.%3$I t where t.listener_changed_at >= $1 '
        'order by t.listener_changed_at, t.%1$I limit %4$s) page',
        key,
        public.listener_row_array_sql_v3(names[1:cardinality(names) - 2], 't',
                                         array['t.xmin::text', 't.listener_changed_at']),
        tbl,
        greatest(1, least(coalesce(p_limit, 1000), 50000)))
    into result using p_since;
    return format('{"columns": %s, "rows": [%s]}', to_json(names), result)::json;
end
$$;

-- Only the owner and service_role may call these.
select public.listener_restrict_functions_v1('listener\_page\_columns\_v3');
select public.listener_restrict_functions_v1('listener\_row\_array\_sql\_v3');
select public.listener_restrict_functions_v1('listener\_tracked\_rows\_v3');
select public.listener_restrict_functions_v1('listener\_changed\_rows\_v3');
