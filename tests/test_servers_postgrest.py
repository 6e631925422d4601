"""The PostgREST test server, proven against the real supabase-py / postgrest-py clients and real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from listener.migrate import reference_migrations
from tests.conftest import scratch_database
from postgrest.exceptions import APIError
from realtime import RealtimeSubscribeStates
from supabase import AsyncClient, AsyncClientOptions, acreate_client

try:
    from tests.servers.postgrest_server import (
        ANON_KEY,
        AUTHENTICATED_TOKEN,
        SERVICE_ROLE_KEY,
        PostgrestServer,
        SupabaseStack,
        make_jwt,
        setup_supabase_roles,
    )
except ImportError:  # tests/ itself is on sys.path
    from servers.postgrest_server import (
        ANON_KEY,
        AUTHENTICATED_TOKEN,
        SERVICE_ROLE_KEY,
        PostgrestServer,
        SupabaseStack,
        make_jwt,
        setup_supabase_roles,
    )

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The app's schema as the listener's development databases have it (every
# reference migration, in order: the sessions status CHECK among them).
REFERENCE_SCHEMA = "\n".join(m.sql for m in reference_migrations())

FUNCTIONS = r"""
create table public.things (id int primary key, note text);

create function public.add_ints(a int, b int) returns int language sql immutable as $$ select a + b $$;
create function public.add_default(a int, b int default 5) returns int language sql immutable as $$ select a + b $$;
create function public.statuses() returns setof text language sql stable
  as $$ select unnest(array['pending', 'live']) $$;
create function public.sessions_by_status(p_status text) returns table (id uuid, status text)
  language sql stable as $$ select s.id, s.status from public.sessions s where s.status = p_status order by s.id $$;
create function public.get_session(p_id uuid) returns public.sessions language sql stable
  as $$ select * from public.sessions where id = p_id $$;
create function public.set_status(p_id uuid, p_status text) returns void language sql
  as $$ update public.sessions set status = p_status where id = p_id $$;
create function public.insert_thing(p_id int, p_note text default null) returns int language sql
  as $$ insert into public.things (id, note) values (p_id, p_note) returning id $$;
create function public.fail_with(p_code text, p_message text) returns void language plpgsql as $$
begin
  raise exception using errcode = p_code, message = p_message, detail = 'some detail', hint = 'some hint';
end $$;
create function public.custom_error() returns void language plpgsql as $$
begin
  raise sqlstate 'PGRST' using message = '{"code":"LSTNR","message":"Payment required"}',
                               detail = '{"status":402,"headers":{"X-Reason":"quota"}}';
end $$;
create function public.whoami() returns json language sql stable as $$
  select json_build_object('role', current_user,
                           'claims', current_setting('request.jwt.claims', true)::json,
                           'method', current_setting('request.method', true))
$$;
create function public.secret_op() returns int language sql as $$ select 42 $$;
revoke execute on function public.secret_op() from public, anon, authenticated;
create function public.half_locked() returns int language sql as $$ select 1 $$;
revoke execute on function public.half_locked() from anon, authenticated;
create function public.echo_json(json) returns json language sql immutable as $$ select $1 $$;
create schema app_private;
create function app_private.hidden() returns int language sql as $$ select 1 $$;
"""


# --------------------------------------------------------------------------- database


@pytest.fixture(scope="module")
def database(pg_admin: str) -> Any:
    """This module's own database (the server on 5432, or the embedded one)."""
    with scratch_database(pg_admin, "test_rest_") as conninfo:
        # as on Supabase, the API roles and default privileges exist before the app's objects
        asyncio.run(setup_supabase_roles(conninfo))
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(REFERENCE_SCHEMA)
            conn.execute(FUNCTIONS)
        yield conninfo


@pytest.fixture
async def db(database: str) -> Any:
    conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
    yield conn
    await conn.close()


@pytest.fixture
async def rest(database: str) -> Any:
    async with PostgrestServer(database) as srv:
        yield srv


async def client_for(url: str, key: str = SERVICE_ROLE_KEY, **options: Any) -> AsyncClient:
    return await acreate_client(url, key, AsyncClientOptions(**options) if options else None)


async def raw_post(rest: PostgrestServer, fn: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    base = {"apikey": SERVICE_ROLE_KEY, "Authorization": f"Bearer {SERVICE_ROLE_KEY}"}
    async with httpx.AsyncClient() as http:
        return await http.post(f"{rest.url}/rest/v1/rpc/{fn}", json=body, headers={**base, **(headers or {})})


async def new_session(db: psycopg.AsyncConnection, status: str = "pending") -> str:
    user_id = str(uuid.uuid4())
    await db.execute("INSERT INTO auth.users (id, email) VALUES (%s, %s)", (user_id, f"{user_id}@example.com"))
    cur = await db.execute(
        "INSERT INTO public.sessions (customer_user_id, status) VALUES (%s, %s) RETURNING id::text", (user_id, status)
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0]


# --------------------------------------------------------------------------- results


async def test_result_shapes(rest: PostgrestServer, db: Any) -> None:
    sid = await new_session(db, status="scheduled")
    client = await client_for(rest.url)
    assert (await client.rpc("add_ints", {"a": 2, "b": 5}).execute()).data == 7
    assert (await client.rpc("add_default", {"a": 2}).execute()).data == 7
    assert (await client.rpc("add_default", {"a": 2, "b": 1}).execute()).data == 3
    assert (await client.rpc("statuses").execute()).data == ["pending", "live"]
    assert (await client.rpc("sessions_by_status", {"p_status": "scheduled"}).execute()).data == [
        {"id": sid, "status": "scheduled"}]
    assert (await client.rpc("sessions_by_status", {"p_status": "nope"}).execute()).data == []
    row = (await client.rpc("get_session", {"p_id": sid}).execute()).data
    assert isinstance(row, dict) and row["id"] == sid and row["status"] == "scheduled"
    assert row["metadata"] == {} and row["mechanic_id"] is None
    assert (await client.rpc("echo_json", {"x": [1, 2]}).execute()).data == {"x": [1, 2]}
    # void: 204 and no body; supabase-py turns it into []
    assert (await client.rpc("set_status", {"p_id": sid, "p_status": "live"}).execute()).data == []
    cur = await db.execute("SELECT status FROM public.sessions WHERE id = %s", (sid,))
    assert (await cur.fetchone()) == ("live",)
    raw = await raw_post(rest, "set_status", {"p_id": sid, "p_status": "live"})
    assert raw.status_code == 204 and raw.content == b""
    raw = await raw_post(rest, "statuses", {})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json; charset=utf-8"
    assert raw.headers["content-range"] == "0-1/*"
    # GET calls pass query parameters and run read-only
    assert (await client.rpc("add_ints", {"a": 1, "b": 1}, get=True).execute()).data == 2
    with pytest.raises(APIError) as info:
        await client.rpc("insert_thing", {"p_id": 1}, get=True).execute()
    assert info.value.code == "25006"
    assert rest.calls[-1].status == 405


async def test_roles_follow_the_keys(rest: PostgrestServer) -> None:
    service = await client_for(rest.url)
    me = (await service.rpc("whoami").execute()).data
    assert me["role"] == "service_role" and me["claims"]["role"] == "service_role" and me["method"] == "POST"
    anon = await client_for(rest.url, ANON_KEY)
    assert (await anon.rpc("whoami").execute()).data["role"] == "anon"
    user = await client_for(rest.url, ANON_KEY, headers={"Authorization": f"Bearer {AUTHENTICATED_TOKEN}"})
    claims = (await user.rpc("whoami").execute()).data
    assert claims["role"] == "authenticated" and claims["claims"]["sub"] == "00000000-0000-0000-0000-000000000001"

    assert (await service.rpc("secret_op").execute()).data == 42
    with pytest.raises(APIError) as info:
        await anon.rpc("secret_op").execute()
    assert info.value.code == "42501" and info.value.message == "permission denied for function secret_op"
    assert rest.calls[-1].status == 401
    with pytest.raises(APIError):
        await user.rpc("secret_op").execute()
    assert rest.calls[-1].status == 403
    # revoking from anon without revoking from PUBLIC locks nothing
    assert (await anon.rpc("half_locked").execute()).data == 1
    raw = await raw_post(rest, "secret_op", {}, {"apikey": ANON_KEY, "Authorization": f"Bearer {ANON_KEY}"})
    assert raw.status_code == 401 and raw.headers["www-authenticate"] == "Bearer"
    assert raw.headers["proxy-status"] == "PostgREST; error=42501"


async def test_api_keys_and_tokens_are_checked(rest: PostgrestServer) -> None:
    async with httpx.AsyncClient() as http:
        url = f"{rest.url}/rest/v1/rpc/add_ints"
        r = await http.post(url, json={"a": 1, "b": 2})
        assert r.status_code == 401 and r.json()["message"] == "No API key found in request"
        r = await http.post(url, json={"a": 1, "b": 2}, headers={"apikey": "nope"})
        assert r.status_code == 401 and r.json() == {
            "message": "Invalid API key", "hint": "Double check your Supabase `anon` or `service_role` API key."}
        r = await http.post(url, json={"a": 1, "b": 2}, headers={"apikey": ANON_KEY, "Authorization": "Bearer abc"})
        assert r.status_code == 401 and r.json()["code"] == "PGRST301"
        expired = make_jwt("authenticated", exp=1)
        r = await http.post(url, json={"a": 1, "b": 2}, headers={"apikey": ANON_KEY, "Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and r.json()["code"] == "PGRST303" and r.json()["message"] == "JWT expired"
        r = await http.post(url, json={"a": 1, "b": 2}, headers={"apikey": ANON_KEY})
        assert r.status_code == 200 and r.json() == 3


async def test_errors_map_like_postgrest(rest: PostgrestServer) -> None:
    client = await client_for(rest.url)
    with pytest.raises(APIError) as info:
        await client.rpc("fail_with", {"p_code": "P0001", "p_message": "boom"}).execute()
    assert info.value.json() == {"code": "P0001", "details": "some detail", "hint": "some hint", "message": "boom"}
    assert rest.calls[-1].status == 400

    expected = {"P0001": 400, "PT402": 402, "23505": 409, "23503": 409, "40001": 500, "42P01": 404,
                "53300": 503, "08006": 503, "22P02": 400, "P0002": 500, "XX000": 500, "28000": 403}
    for code, status in expected.items():
        raw = await raw_post(rest, "fail_with", {"p_code": code, "p_message": "x"})
        assert raw.status_code == status, code
        assert raw.json()["code"] == code and raw.headers["proxy-status"] == f"PostgREST; error={code}"

    assert (await client.rpc("insert_thing", {"p_id": 7}).execute()).data == 7
    with pytest.raises(APIError) as info:
        await client.rpc("insert_thing", {"p_id": 7, "p_note": "again"}).execute()
    assert info.value.code == "23505" and 'Key (id)=(7) already exists.' == info.value.details
    assert rest.calls[-1].status == 409

    raw = await raw_post(rest, "custom_error", {})
    assert raw.status_code == 402 and raw.headers["x-reason"] == "quota"
    assert raw.json() == {"code": "LSTNR", "details": None, "hint": None, "message": "Payment required"}


async def test_unknown_functions_arguments_and_schemas(rest: PostgrestServer) -> None:
    client = await client_for(rest.url)
    with pytest.raises(APIError) as info:
        await client.rpc("add_intz", {"a": 1, "b": 2}).execute()
    assert info.value.json() == {
        "code": "PGRST202",
        "details": "Searched for the function public.add_intz with parameters a, b or with a single unnamed "
                   "json/jsonb parameter, but no matches were found in the schema cache.",
        "hint": "Perhaps you meant to call the function public.add_ints",
        "message": "Could not find the function public.add_intz(a, b) in the schema cache",
    }
    assert rest.calls[-1].status == 404
    with pytest.raises(APIError) as info:
        await client.rpc("add_ints", {"a": 1, "c": 2}).execute()
    assert info.value.code == "PGRST202"
    assert info.value.message == "Could not find the function public.add_ints(a, c) in the schema cache"
    assert info.value.hint == "Perhaps you meant to call the function public.add_ints(a, b)"
    with pytest.raises(APIError) as info:
        await client.rpc("whoami", {"x": 1}).execute()
    assert info.value.code == "PGRST202"

    with pytest.raises(APIError) as info:
        await client.schema("app_private").rpc("hidden", {}).execute()
    assert info.value.json() == {"code": "PGRST106", "details": None,
                                 "hint": "Only the following schemas are exposed: public, graphql_public",
                                 "message": "Invalid schema: app_private"}
    assert rest.calls[-1].status == 406
    raw = await raw_post(rest, "add_ints", {"a": 1, "b": 2}, {"Content-Profile": "public"})
    assert raw.json() == 3


async def test_fault_knobs(rest: PostgrestServer, db: Any) -> None:
    client = await client_for(rest.url)
    rest.fail_status = 500
    with pytest.raises(APIError) as info:
        await client.rpc("add_ints", {"a": 1, "b": 1}).execute()
    assert info.value.code == "XX000" and rest.calls[-1].status == 500
    rest.fail_status = None

    rest.fail_next(2, status=503)
    for _ in range(2):
        with pytest.raises(APIError):
            await client.rpc("insert_thing", {"p_id": 100}).execute()
    assert [c.status for c in rest.calls[-2:]] == [503, 503]
    assert (await client.rpc("insert_thing", {"p_id": 100}).execute()).data == 100  # POSTs are not retried

    # a float timeout is truncated to whole seconds by postgrest-py (0.5 -> 0): pass an httpx.Timeout
    impatient = await client_for(rest.url, postgrest_client_timeout=httpx.Timeout(0.5))
    rest.hang_seconds = 2
    with pytest.raises(httpx.ReadTimeout):
        await impatient.rpc("insert_thing", {"p_id": 101}).execute()
    cur = await db.execute("SELECT count(*) FROM public.things WHERE id = 101")
    assert (await cur.fetchone()) == (0,)  # the server is still sitting on it, before the database
    rest.hang_after_commit = True
    with pytest.raises(httpx.ReadTimeout):
        await impatient.rpc("insert_thing", {"p_id": 102}).execute()
    cur = await db.execute("SELECT count(*) FROM public.things WHERE id = 102")
    assert (await cur.fetchone()) == (1,)  # committed although the client gave up
    rest.hang_seconds = 0
    rest.hang_after_commit = False
    calls = {c.args["p_id"]: c for c in rest.calls if c.function == "insert_thing" and c.args["p_id"] > 100}
    await rest.wait_for(lambda: calls[101].status == 499 and calls[102].status == 200, timeout=10)
    cur = await db.execute("SELECT array_agg(id ORDER BY id) FROM public.things WHERE id > 100")
    assert (await cur.fetchone()) == ([102],)  # the call the client abandoned before the database never ran


async def test_one_url_for_rest_and_realtime(database: str, db: Any) -> None:
    async with SupabaseStack(database) as stack:
        client = await client_for(stack.url, realtime={"max_retries": 5, "initial_backoff": 0.2})
        try:
            assert (await client.rpc("add_ints", {"a": 20, "b": 22}).execute()).data == 42
            states: list[RealtimeSubscribeStates] = []
            system: list[str] = []
            changes: list[dict[str, Any]] = []
            channel = client.channel("listener")
            channel.on_postgres_changes("*", changes.append, table="sessions", schema="public")
            channel.on_system(lambda p: system.append(p.message))  # a pydantic model, not a dict
            await channel.subscribe(lambda s, e: states.append(s))
            assert states == [RealtimeSubscribeStates.SUBSCRIBED]
            await stack.realtime.wait_for(lambda: len(system) == 1)
            sid = await new_session(db)
            await client.rpc("set_status", {"p_id": sid, "p_status": "live"}).execute()
            await stack.realtime.wait_for(lambda: len(changes) == 2)
            assert [c["data"]["type"] for c in changes] == ["INSERT", "UPDATE"]
            assert changes[1]["data"]["record"]["status"] == "live"

            stack.gateway.sever_all()  # TCP cut without a close frame: the client reconnects
            await stack.realtime.wait_for(lambda: len(system) == 2 and stack.realtime.connections_total == 2)
            assert states[-1] == RealtimeSubscribeStates.SUBSCRIBED
            assert (await client.rpc("add_ints", {"a": 1, "b": 1}).execute()).data == 2
        finally:
            await client.remove_all_channels()
