"""Migrations: the files applied one by one equal `migrate`; migrate twice is a
no-op on a database with app data; release-1 ledger rows survive 0006; the
functions 0006 replaces are gone; the API roles can execute none of them."""
from __future__ import annotations

import asyncio
from typing import Iterator

import psycopg
import pytest

from listener import migrate
from listener.adapters.calls import CALLS, Shape
from listener.rules.query import TableQuery
from tests.conftest import scratch_database
from tests.servers.postgrest_server import setup_supabase_roles
from tests.sql_tables import HOLDS, QUERIES, TABLES_SQL, create_tables, uid

REPLACED = ("listener_fire", "listener_complete", "listener_tracked_sessions",
            "listener_read_session", "listener_session_contacts", "listener_unfinished_claims",
            "listener_session_json", "listener_rule_json", "listener_claim",
            "listener_transition", "listener_stamp_status_change",
            "listener_notify_session_change")

SNAPSHOT = """
select 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       md5(pg_get_functiondef(p.oid)) || ' ' || coalesce(p.proacl::text, '')
  from pg_proc p where p.pronamespace = 'public'::regnamespace
union all
select 'column', c.table_name || '.' || c.column_name,
       c.data_type || ' ' || c.is_nullable || ' ' || coalesce(c.column_default, '')
  from information_schema.columns c where c.table_schema = 'public'
union all
select 'index', i.indexname, i.indexdef from pg_indexes i where i.schemaname = 'public'
union all
select 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, pg_get_triggerdef(t.oid)
  from pg_trigger t where not t.tgisinternal
union all
select 'constraint', c.conrelid::regclass::text || '.' || c.conname, pg_get_constraintdef(c.oid)
  from pg_constraint c where c.connamespace = 'public'::regnamespace
union all
select 'table', c.relname, c.relrowsecurity::text || ' ' || coalesce(c.relacl::text, '')
  from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
order by 1, 2
"""


@pytest.fixture
def empty(pg_admin: str) -> Iterator[str]:
    with scratch_database(pg_admin, "listener_m_") as conninfo:
        yield conninfo


@pytest.fixture
def empty2(pg_admin: str) -> Iterator[str]:
    with scratch_database(pg_admin, "listener_m_") as conninfo:
        yield conninfo


def run(conninfo: str, sql: str, params: tuple | None = None) -> list[tuple]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def apply_files(conninfo: str, upto: str | None = None) -> None:
    """What an operator pasting the files one by one into the SQL editor does."""
    for m in migrate.reference_migrations():
        run(conninfo, m.sql)
    run(conninfo, migrate.BOOTSTRAP)
    for m in migrate.listener_migrations():
        if upto is not None and m.name > upto:
            break
        run(conninfo, m.sql)


def snapshot(conninfo: str) -> list[tuple]:
    return run(conninfo, SNAPSHOT)


def test_files_in_order_equal_migrate(empty: str, empty2: str) -> None:
    apply_files(empty)
    assert migrate.apply(empty2, include_reference=True)
    assert snapshot(empty) == snapshot(empty2)
    assert [m.name for m in migrate.listener_migrations()][-1] >= "0006"


def test_migrate_twice_is_a_no_op_on_a_database_with_data(empty: str) -> None:
    migrate.apply(empty, include_reference=True)
    create_tables(empty)
    assert migrate.apply(empty, queries=QUERIES) == [
        "watch test_holds", "watch sessions", "watch session_extensions"]
    run(empty, "insert into public.test_holds (hold_no, state) values (1, 'held'), (2, 'held')")
    run(empty, "insert into public.sessions (id, status) values (%s, 'live')", (uid(1),))
    rows = "select xmin::text, * from public.test_holds union all " \
           "select xmin::text, hold_no, state, null, null, null, null, null, null, null " \
           "from public.test_holds where false order by 2"
    before, data = snapshot(empty), run(empty, rows)
    installed = run(empty, "select table_name, installed_at from public.listener_watched")
    assert migrate.apply(empty, queries=QUERIES) == []
    assert migrate.missing(empty, QUERIES) == []
    # Nothing changed, no row rewritten (same xmin), no watch reinstalled.
    assert snapshot(empty) == before and run(empty, rows) == data
    assert run(empty, "select table_name, installed_at from public.listener_watched") == installed


def test_a_changed_query_is_missing_until_migrated(database: str) -> None:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    wider = {"test_holds": TableQuery(HOLDS.table, HOLDS.key, HOLDS.status,
                                      (*HOLDS.columns, "updated_at"), HOLDS.conditions,
                                      stamps_status=True)}
    assert migrate.missing(database, wider) == ["watch test_holds"]
    # Offsets and maps change nothing in the database: not a reason to migrate.
    shifted = {"test_holds": TableQuery(HOLDS.table, HOLDS.key, HOLDS.status, HOLDS.columns,
                                        (), stamps_status=True)}
    assert migrate.missing(database, shifted) == []
    assert migrate.apply(database, queries=wider) == ["watch test_holds"]
    assert migrate.missing(database, wider) == []
    trigger_args = run(database, "select pg_get_triggerdef(oid) from pg_trigger "
                                 "where tgname = 'listener_notify_change' "
                                 "and tgrelid = 'public.test_holds'::regclass")[0][0]
    assert "updated_at" in trigger_args


def test_a_watch_for_a_missing_table_is_skipped_with_a_notice(database: str) -> None:
    ghost = {"ghosts": TableQuery("ghosts", "id", "status", ("id", "status"), ())}
    notices: list[str] = []
    with psycopg.connect(database, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        assert conn.execute("select public.listener_watch_v1(%s::jsonb)",
                            (migrate._watch_text(ghost["ghosts"]),)).fetchone()[0] is False
    assert any("ghosts does not exist" in n for n in notices)
    assert migrate.apply(database, queries=ghost) == []
    assert migrate.missing(database, ghost) == []
    script = migrate.script(queries={**ghost, **QUERIES})
    assert "select public.listener_watch_v1('" in script
    create_tables(database)
    run(database, script)  # the SQL editor path: the missing table does not stop it
    watched = {name for (name,) in run(database, "select table_name from public.listener_watched")}
    assert {"session_extensions", "sessions", "test_holds"} <= watched and "ghosts" not in watched


def test_unwatch_removes_the_triggers(database: str) -> None:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    assert run(database, "select public.listener_unwatch_v1('test_holds')") == [(True,)]
    assert run(database, "select count(*) from pg_trigger where tgrelid = "
                         "'public.test_holds'::regclass and not tgisinternal") == [(0,)]
    assert migrate.missing(database, QUERIES) == ["watch test_holds"]


def test_release_1_ledger_rows_survive_the_upgrade(empty: str) -> None:
    apply_files(empty, upto="0005")
    sid = uid(7)
    run(empty, "insert into public.sessions (id, status) values (%s, 'pending')", (sid,))
    token = run(empty, "select public.listener_lease_acquire('old', 60000)")[0][0]
    # A release-1 claim left unfinished, and a finished one, made by release 1's own function.
    run(empty, "select public.listener_fire('request_expiry', %s, '2026-03-02T10:15:00Z', "
               "'old', %s, '2026-03-02T10:15:01Z', null, '{pending}', 'expired', "
               "'no_mechanic_available')", (sid, token))
    run(empty, "select public.listener_fire('support_unassigned_alert', %s, "
               "'2026-03-02T10:05:00Z', 'old', %s, '2026-03-02T10:05:00Z', null, null, null, "
               "null, 'fired', 12, '{\"recipients\": [\"support\"]}')", (sid, token))
    # Overloads from history, whatever their signature, go too.
    run(empty, "create function public.listener_claim(a int) returns int language sql "
               "as 'select 1'")
    run(empty, "create function public.listener_transition(a text, b text) returns int "
               "language sql as 'select 1'")
    columns = "rule, session_id, due_at, state, status_applied, attempts, holder, " \
              "fencing_token, claimed_at, fired_at, completed_at, lateness_ms, detail"
    old = run(empty, f"select {columns} from public.listener_ledger order by rule")
    for m in migrate.listener_migrations():
        if m.name > "0005":
            run(empty, m.sql)
    assert run(empty, f"select {columns} from public.listener_ledger order by rule") == old
    assert run(empty, "select table_name, row_key, batch_key from public.listener_ledger") == [
        ("sessions", sid, None)] * 2
    # The unfinished claim is resumed under the same key by the v2 functions.
    claims = run(empty, "select public.listener_unfinished_claims_v2()")[0][0]
    assert [(c["rule"], c["table_name"], c["row_key"], c["status_applied"]) for c in claims] == [
        ("request_expiry", "sessions", sid, True)]
    assert run(empty, "select public.listener_complete_v2(p_rule => 'request_expiry', "
                      "p_table => 'sessions', p_key => %s, p_due_at => '2026-03-02T10:15:00Z', "
                      "p_holder => 'old', p_token => %s, p_outcome => 'fired', "
                      "p_fired_at => '2026-03-02T10:15:01Z', p_lateness_ms => 1000)",
               (sid, token)) == [(True,)]
    names = {r[0] for r in run(empty, "select proname from pg_proc "
                                      "where pronamespace = 'public'::regnamespace")}
    assert not names & set(REPLACED)
    assert run(empty, "select count(*) from pg_trigger where tgrelid = 'public.sessions'::regclass "
                      "and not tgisinternal") == [(0,)]  # until a watch installs its own


def test_the_api_roles_cannot_execute_any_listener_function(empty: str) -> None:
    # As on Supabase: the roles exist and default privileges grant them every new function.
    asyncio.run(setup_supabase_roles(empty))
    migrate.apply(empty, include_reference=True)
    run(empty, TABLES_SQL)
    migrate.apply(empty, queries=QUERIES)
    functions = run(empty, "select p.oid::regprocedure::text from pg_proc p "
                           "where p.pronamespace = 'public'::regnamespace "
                           "and p.proname like 'listener\\_%'")
    assert len(functions) >= 20
    for (fn,) in functions:
        for role in ("anon", "authenticated", "public"):
            if role == "public":
                granted = run(empty, "select exists (select 1 from pg_proc p, "
                                     "aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
                                     "where p.oid = %s::regprocedure and a.grantee = 0)", (fn,))
            else:
                granted = run(empty, "select has_function_privilege(%s, %s, 'execute')",
                              (role, fn))
            assert granted == [(False,)], f"{role} may execute {fn}"
        assert run(empty, "select has_function_privilege('service_role', %s, 'execute')",
                   (fn,)) == [(True,)], fn
    for table in ("listener_ledger", "listener_lease", "listener_watched"):
        assert run(empty, "select has_table_privilege('anon', %s, 'select')",
                   (f"public.{table}",)) == [(False,)]


def test_every_call_in_the_table_matches_its_function(empty: str) -> None:
    """The table of calls is the contract both backends send: each function it
    names exists once, with exactly its parameters (names, types, in order),
    returning a set of rows where the call says so, and a default for every
    parameter a call may leave out."""
    migrate.apply(empty, include_reference=True)
    rows = run(empty, """
        select p.proname, p.proargnames, p.pronargs, p.pronargdefaults, p.proretset,
               array(select format_type(t, null) from unnest(p.proargtypes) t)
          from pg_proc p where p.pronamespace = 'public'::regnamespace
           and p.proname = any(%s)""", ([call.function for call in CALLS],))
    found = {name: rest for name, *rest in rows}
    assert len(rows) == len(found), "a function of the table is overloaded"
    declared = sorted({kind.value for call in CALLS for _, kind in call.params})
    canonical = dict(run(empty, "select t, format_type(t::regtype, null) from unnest(%s::text[]) t",
                         (declared,)))
    for call in CALLS:
        assert call.function in found, f"{call.function} is not migrated"
        names, count, defaults, returns_set, types = found[call.function]
        assert list((names or [])[:count]) == list(call.names), call.function
        assert types == [canonical[kind.value] for _, kind in call.params], call.function
        assert returns_set == (call.shape is Shape.ROWS), call.function
        assert set(call.optional) <= set(call.names[count - defaults:]), call.function
