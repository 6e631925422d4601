"""Driver errors, produced against the real PostgreSQL, land in the right class."""
from __future__ import annotations

from collections.abc import Iterator

import psycopg
import psycopg_pool
import pytest

from listener.errors import (BadInput, Effect, EffectFailed, ListenerError, Refusal,
                             StoreRefused, StoreUnavailable, classify_db_error,
                             classify_http_error, is_transient)
from tests.conftest import scratch_database


@pytest.fixture
def conninfo(pg_admin: str) -> Iterator[str]:
    with scratch_database(pg_admin, "listener_err_") as conninfo:
        yield conninfo


def raised(conninfo: str, *statements: str, **connect: object) -> BaseException:
    """The exception the last statement raises."""
    with psycopg.connect(conninfo, autocommit=True, **connect) as conn:  # type: ignore[arg-type]
        for statement in statements[:-1]:
            conn.execute(statement)
        with pytest.raises(psycopg.Error) as info:
            conn.execute(statements[-1]).fetchall()
    return info.value


def test_terminated_connection_is_unavailable(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn, \
            psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.errors.AdminShutdown) as first:
            conn.execute("select 1")
        with pytest.raises(psycopg.OperationalError) as closed:  # "the connection is closed"
            conn.execute("select 1")
    for exc in (first.value, closed.value):
        error = classify_db_error(exc, operation="listener_fire")
        assert isinstance(error, StoreUnavailable) and is_transient(error), exc
        assert error.operation == "listener_fire" and str(error).startswith("listener_fire: ")
    assert classify_db_error(first.value).sqlstate == "57P01"


def test_own_connection_terminated(conninfo: str) -> None:
    exc = raised(conninfo, "select pg_terminate_backend(pg_backend_pid())")
    assert isinstance(exc, psycopg.errors.AdminShutdown)
    assert isinstance(classify_db_error(exc), StoreUnavailable)


def test_statement_timeout_is_unavailable(conninfo: str) -> None:
    exc = raised(conninfo, "set statement_timeout = '50ms'", "select pg_sleep(2)")
    assert isinstance(exc, psycopg.errors.QueryCanceled)
    assert isinstance(classify_db_error(exc), StoreUnavailable)


def test_server_not_listening_is_unavailable() -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect("host=127.0.0.1 port=1 user=postgres dbname=postgres connect_timeout=2")
    assert info.value.sqlstate is None
    assert isinstance(classify_db_error(info.value), StoreUnavailable)


def test_pool_timeout_is_unavailable(conninfo: str) -> None:
    with psycopg_pool.ConnectionPool(conninfo, min_size=1, max_size=1, open=True) as pool:
        with pool.connection():
            with pytest.raises(psycopg_pool.PoolTimeout) as info:
                with pool.connection(timeout=0.1):
                    pass
    assert isinstance(classify_db_error(info.value), StoreUnavailable)


@pytest.mark.parametrize("setup, statement, error_type, reason", [
    ((), "select listener_no_such_function()", psycopg.errors.UndefinedFunction, Refusal.MISSING),
    ((), "select * from listener_no_such_table", psycopg.errors.UndefinedTable, Refusal.MISSING),
    (("create table t (id int primary key)", "create role listener_err_nobody",
      "set role listener_err_nobody"),
     "select * from t", psycopg.errors.InsufficientPrivilege, Refusal.PERMISSION),
    (("create table t (id int primary key)", "insert into t values (1)"),
     "insert into t values (1)", psycopg.errors.UniqueViolation, Refusal.CONSTRAINT),
    ((), "select 'soon'::timestamptz", psycopg.errors.InvalidDatetimeFormat, Refusal.DATA),
    ((), "select 'x'::int", psycopg.errors.InvalidTextRepresentation, Refusal.DATA),
    ((), "do $$ begin raise exception 'stale fencing token'; end $$",
     psycopg.errors.RaiseException, Refusal.OTHER),
])
def test_database_saying_no_is_refused(conninfo: str, pg_admin: str, setup: tuple[str, ...],
                                       statement: str, error_type: type, reason: Refusal) -> None:
    try:
        exc = raised(conninfo, *setup, statement)
    finally:
        if any("create role" in s for s in setup):
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("drop table if exists t")
                conn.execute("drop role if exists listener_err_nobody")
    assert type(exc) is error_type
    error = classify_db_error(exc)
    assert isinstance(error, StoreRefused) and not is_transient(error)
    assert error.reason is reason and error.sqlstate == exc.sqlstate


def test_value_psycopg_cannot_load_is_refused_as_data(conninfo: str) -> None:
    exc = raised(conninfo, "select 'infinity'::timestamptz")
    assert type(exc) is psycopg.DataError and exc.sqlstate is None
    error = classify_db_error(exc)
    assert isinstance(error, StoreRefused) and error.reason is Refusal.DATA


def test_login_refused_is_not_retried(conninfo: str) -> None:
    missing_db = conninfo.replace("dbname=listener_err_", "dbname=listener_gone_")
    missing_role = conninfo.replace("user=postgres", "user=listener_no_such_role")
    for url, reason in ((missing_db, Refusal.MISSING), (missing_role, Refusal.PERMISSION)):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(url)
        assert info.value.sqlstate is None  # libpq gives only the text at login
        error = classify_db_error(info.value)
        assert isinstance(error, StoreRefused) and error.reason is reason, str(info.value)


def test_other_exceptions_pass_through() -> None:
    bug = KeyError("status")
    assert classify_db_error(bug) is bug  # a bug is never reported as an outage
    already = StoreRefused("no")
    assert classify_db_error(already) is already
    assert isinstance(classify_db_error(ConnectionResetError()), StoreUnavailable)
    assert isinstance(classify_db_error(TimeoutError()), StoreUnavailable)


@pytest.mark.parametrize("status, code, expected, reason", [
    (None, None, StoreUnavailable, None),                # network error, timeout
    (500, None, StoreUnavailable, None),
    (502, None, StoreUnavailable, None),                 # a proxy in front of PostgREST
    (503, "PGRST001", StoreUnavailable, None),           # PostgREST lost the database
    (503, "PGRST002", StoreUnavailable, None),           # schema cache loading
    (504, "PGRST003", StoreUnavailable, None),           # its pool timed out
    (503, "53300", StoreUnavailable, None),              # too many connections
    (500, "57014", StoreUnavailable, None),              # statement timeout
    (409, "40001", StoreUnavailable, None),              # serialization failure
    (429, None, StoreUnavailable, None),
    (408, None, StoreUnavailable, None),
    (500, "XX000", StoreRefused, Refusal.OTHER),         # internal error: same answer again
    (400, "P0001", StoreRefused, Refusal.OTHER),         # raise exception
    (500, "54000", StoreRefused, Refusal.LIMIT),
    (404, "PGRST202", StoreRefused, Refusal.MISSING),    # unknown function or arguments
    (300, "PGRST203", StoreRefused, Refusal.MISSING),    # overloaded function
    (406, "PGRST106", StoreRefused, Refusal.MISSING),    # schema not exposed
    (404, "42883", StoreRefused, Refusal.MISSING),
    (401, "42501", StoreRefused, Refusal.PERMISSION),
    (403, "42501", StoreRefused, Refusal.PERMISSION),
    (401, "PGRST301", StoreRefused, Refusal.PERMISSION),  # bad JWT
    (500, "PGRST300", StoreRefused, Refusal.PERMISSION),  # server lacks the JWT secret
    (401, None, StoreRefused, Refusal.PERMISSION),
    (409, "23505", StoreRefused, Refusal.CONSTRAINT),
    (400, "22P02", StoreRefused, Refusal.DATA),
    (400, "PGRST100", StoreRefused, Refusal.OTHER),
    (422, None, StoreRefused, Refusal.OTHER),
])
def test_postgrest_answers(status: int | None, code: str | None, expected: type,
                           reason: Refusal | None) -> None:
    error = classify_http_error(status, code, "message", operation="listener_fire")
    assert type(error) is expected
    assert error.status == status and error.sqlstate == code
    assert "listener_fire" in str(error)
    if reason is not None:
        assert error.reason is reason  # type: ignore[attr-defined]


def test_retry_after_is_kept() -> None:
    assert classify_http_error(429, None, retry_after=2.5).retry_after == 2.5
    assert classify_http_error(503, None, retry_after=1.0).retry_after == 1.0


def test_bad_input_names_the_row() -> None:
    error = BadInput("slot_reservations", "r-1", "unparsable timestamp", column="expires_at")
    assert str(error) == "slot_reservations/r-1.expires_at: unparsable timestamp"
    assert (error.table, error.key, error.column) == ("slot_reservations", "r-1", "expires_at")
    assert str(BadInput("sessions", None, "payload has no id")) == "sessions/?: payload has no id"
    assert not is_transient(error) and isinstance(error, ListenerError)


def test_effect_failed_says_whether_to_retry() -> None:
    assert is_transient(EffectFailed("502", transient=True, status=502))
    webhook = EffectFailed("410 Gone", transient=False, status=410, effect=Effect.WEBHOOK)
    assert not is_transient(webhook) and webhook.effect is Effect.WEBHOOK
    assert EffectFailed("x", transient=True).effect is Effect.EMAIL
