-- Reference stand-in of the app's schema, for the embedded database, tests and
-- local development ONLY. The real app already has these tables on Supabase:
-- `listener migrate` never applies this file unless asked (--reference).
create schema if not exists auth;

create table if not exists auth.users (
    id uuid primary key default gen_random_uuid(),
    email text
);

create table if not exists public.profiles (
    id uuid primary key references auth.users (id) on delete cascade,
    full_name text
);

create table if not exists public.mechanics (
    id uuid primary key default gen_random_uuid(),
    user_id uuid references auth.users (id),
    name text,
    email text
);

create table if not exists public.sessions (
    id uuid primary key default gen_random_uuid(),
    status text not null default 'pending',
    type text not null default 'video',
    customer_user_id uuid references auth.users (id),
    mechanic_id uuid references public.mechanics (id),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    started_at timestamptz,
    ended_at timestamptz,
    cancelled_at timestamptz,
    scheduled_for timestamptz,
    expires_at timestamptz,
    summary_submitted_at timestamptz,
    metadata jsonb not null default '{}'::jsonb
);
