-- Row changes for the LISTEN/NOTIFY source (the PostgreSQL backend). Only the
-- columns the rules read travel; NOTIFY payloads are limited to 8000 bytes, so
-- an oversized one carries the id alone and the daemon reads the row.
create or replace function public.listener_notify_session_change()
returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    payload text;
    r public.sessions;
begin
    if tg_op = 'DELETE' then
        r := old;
        payload := jsonb_build_object('type', tg_op, 'old_record', jsonb_build_object('id', old.id))::text;
    else
        r := new;
        -- The row's version (its xmin) is this transaction's id: the daemon
        -- compares it when it acts, so it need not read the row again.
        payload := jsonb_build_object(
            'type', tg_op,
            'record', public.listener_rule_json(r, pg_current_xact_id()::xid))::text;
    end if;
    if octet_length(payload) > 7900 then
        payload := jsonb_build_object('type', tg_op, 'id', r.id, 'truncated', true)::text;
    end if;
    perform pg_notify('listener_sessions', payload);
    return null;
end
$$;

drop trigger if exists listener_notify_session_change on public.sessions;
create trigger listener_notify_session_change
    after insert or update or delete on public.sessions
    for each row execute function public.listener_notify_session_change();

revoke all on function public.listener_notify_session_change() from public;
