-- Supabase Realtime streams only tables in the supabase_realtime publication.
-- Elsewhere (plain PostgreSQL) the publication does not exist: nothing to do.
-- REPLICA IDENTITY FULL is not needed: the daemon reads new rows only and
-- re-reads a row whenever a change arrives without it.
do $$
begin
    if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
       and not exists (select 1 from pg_publication_tables
                        where pubname = 'supabase_realtime'
                          and schemaname = 'public' and tablename = 'sessions')
    then
        alter publication supabase_realtime add table public.sessions;
    end if;
end
$$;
