-- When a session entered its current status: the anchor of most rules.
-- Additive and idempotent: safe on the app's live database.
alter table public.sessions add column if not exists status_changed_at timestamptz;

-- Backfill from updated_at: the best instant the table already knows.
update public.sessions
   set status_changed_at = coalesce(updated_at, created_at, now())
 where status_changed_at is null;

alter table public.sessions alter column status_changed_at set default now();

create or replace function public.listener_stamp_status_change()
returns trigger
language plpgsql
set search_path = public, pg_temp
as $$
begin
    if tg_op = 'INSERT' then
        new.status_changed_at := coalesce(new.status_changed_at, now());
    elsif new.status is distinct from old.status then
        -- A writer that sets the column itself (a backfill, a test) is trusted.
        if new.status_changed_at is not distinct from old.status_changed_at then
            new.status_changed_at := now();
        end if;
    elsif new.status_changed_at is null then
        new.status_changed_at := old.status_changed_at;
    end if;
    return new;
end
$$;

drop trigger if exists listener_stamp_status_change on public.sessions;
create trigger listener_stamp_status_change
    before insert or update on public.sessions
    for each row execute function public.listener_stamp_status_change();
