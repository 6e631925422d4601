"""The errors the daemon branches on, and how driver errors map onto them.

- StoreUnavailable: the database could not be reached, the connection dropped,
  or it asked us to come back later. Transient: retry with backoff. The outcome
  of a call that failed this way may be unknown (it may have committed), so
  only idempotent or fenced calls are retried.
- StoreRefused: the database answered and said no (permission, a missing
  function or column, a constraint, a value it cannot take). Retrying the same
  call gives the same answer: it is final for that call.
- BadInput: a row or payload we cannot read. It names the table and the key so
  the log line leads to the row; the row is skipped, the daemon keeps running.
- EffectFailed: an email or webhook did not go out; `transient` says whether
  another attempt may succeed.

Every ListenerError has `transient`; `retry_after` (seconds) when the other
side said how long to wait. Anything that is not a ListenerError reaching the
daemon's loop is a bug: logged with its traceback, never taken for an outage.
"""
from __future__ import annotations

import asyncio
import re
from enum import Enum
from typing import overload

import psycopg


class ListenerError(Exception):
    transient: bool = False
    retry_after: float | None = None


class Refusal(str, Enum):
    """Why the database said no; PERMISSION and MISSING are set-up problems."""

    PERMISSION = "permission"   # role, grant, password, row level security
    MISSING = "missing"         # function, table, column, schema, database
    CONSTRAINT = "constraint"   # unique, foreign key, check, not null
    DATA = "data"               # a value the column or function cannot take
    LIMIT = "limit"             # a program limit (too large, too complex)
    OTHER = "other"             # raised by a function, internal error, ...


class StoreError(ListenerError):
    """A call to the database (SQL or RPC) that failed."""

    def __init__(self, message: str, *, sqlstate: str | None = None,
                 status: int | None = None, operation: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate      # SQLSTATE, or PostgREST's PGRST code
        self.status = status          # HTTP status, for the RPC store
        self.operation = operation    # the SQL function or query that failed


class StoreUnavailable(StoreError):
    transient = True

    def __init__(self, message: str, *, sqlstate: str | None = None, status: int | None = None,
                 operation: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, sqlstate=sqlstate, status=status, operation=operation)
        self.retry_after = retry_after


class StoreRefused(StoreError):
    def __init__(self, message: str, *, reason: Refusal = Refusal.OTHER,
                 sqlstate: str | None = None, status: int | None = None,
                 operation: str | None = None) -> None:
        super().__init__(message, sqlstate=sqlstate, status=status, operation=operation)
        self.reason = reason


class BadInput(ListenerError):
    """A row or payload that cannot be read; `column` when one value is to blame."""

    def __init__(self, table: str, key: str | None, detail: str, *,
                 column: str | None = None) -> None:
        where = f"{table}/{key if key is not None else '?'}"
        super().__init__(f"{where}{'.' + column if column else ''}: {detail}")
        self.table = table
        self.key = key
        self.detail = detail
        self.column = column


class Effect(str, Enum):
    EMAIL = "email"
    WEBHOOK = "webhook"


class EffectFailed(ListenerError):
    """An email or webhook that did not succeed."""

    effect: Effect = Effect.EMAIL

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None,
                 status: int | None = None, effect: Effect | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        if effect is not None:
            self.effect = effect


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt of the same call may succeed."""
    return isinstance(exc, ListenerError) and exc.transient


# --------------------------------------------------------------------------- SQLSTATE

# By SQLSTATE class (first two characters), then exceptions within a class.
_TRANSIENT_CLASSES = {
    "08",  # connection exception
    "40",  # transaction rollback: serialization failure, deadlock
    "53",  # insufficient resources: too many connections, out of memory, disk full
    "57",  # operator intervention: shutdown, crash, cannot connect now, query canceled
    "58",  # system error (I/O)
}
_TRANSIENT_CODES = {
    "55P03",  # lock not available
    "55006",  # object in use
    "25P03",  # idle-in-transaction timeout: the server closed the session
}
_PERMANENT_CODES = {
    "57P04": Refusal.MISSING,  # database dropped
}
_REFUSAL_BY_CLASS = {
    "28": Refusal.PERMISSION,  # invalid authorization
    "42": Refusal.OTHER,       # syntax or access rule, refined below
    "23": Refusal.CONSTRAINT,
    "22": Refusal.DATA,
    "54": Refusal.LIMIT,
    "3D": Refusal.MISSING,     # invalid catalog (database) name
    "3F": Refusal.MISSING,     # invalid schema name
}
_REFUSAL_BY_CODE = {
    "42501": Refusal.PERMISSION,
    "42883": Refusal.MISSING,  # undefined function
    "42P01": Refusal.MISSING,  # undefined table
    "42703": Refusal.MISSING,  # undefined column
    "42704": Refusal.MISSING,  # undefined object
    "3F000": Refusal.MISSING,
}


def sqlstate_is_transient(sqlstate: str) -> bool:
    if sqlstate in _PERMANENT_CODES:
        return False
    return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate in _TRANSIENT_CODES


def refusal_of(sqlstate: str | None) -> Refusal:
    if sqlstate is None:
        return Refusal.OTHER
    return (_REFUSAL_BY_CODE.get(sqlstate) or _PERMANENT_CODES.get(sqlstate)
            or _REFUSAL_BY_CLASS.get(sqlstate[:2]) or Refusal.OTHER)


# Errors at connection time carry no SQLSTATE (libpq reports only the text).
# These ones will not go away by waiting: a wrong URL, user, password or database.
_CONNECT_REFUSALS = (
    (re.compile(r"password authentication failed|no pg_hba\.conf entry|"
                r"role \".*\" does not exist|tenant or user not found", re.I), Refusal.PERMISSION),
    (re.compile(r"database \".*\" does not exist", re.I), Refusal.MISSING),
)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


@overload
def classify_db_error(exc: psycopg.Error | OSError | TimeoutError, *,
                      operation: str | None = None) -> ListenerError: ...
@overload
def classify_db_error(exc: BaseException, *, operation: str | None = None) -> BaseException: ...


def classify_db_error(exc: BaseException, *, operation: str | None = None) -> BaseException:
    """A psycopg (or network) error as StoreUnavailable or StoreRefused.

    A ListenerError comes back as it is; any other exception comes back
    unchanged too, so `raise classify_db_error(exc) from exc` never turns a bug
    into an outage.
    """
    if isinstance(exc, ListenerError):
        return exc
    where = f"{operation}: " if operation else ""
    message = where + _first_line(exc)
    if isinstance(exc, psycopg.Error):
        sqlstate = exc.sqlstate
        if sqlstate is not None:
            if sqlstate_is_transient(sqlstate):
                return StoreUnavailable(message, sqlstate=sqlstate, operation=operation)
            return StoreRefused(message, reason=refusal_of(sqlstate), sqlstate=sqlstate,
                                operation=operation)
        # No SQLSTATE: the client side failed (connect, lost connection, pool
        # timeout, connection closed) - unless the server refused the login.
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            for pattern, reason in _CONNECT_REFUSALS:
                if pattern.search(str(exc)):
                    return StoreRefused(message, reason=reason, operation=operation)
            return StoreUnavailable(message, operation=operation)
        if isinstance(exc, psycopg.DataError):
            # e.g. a timestamp psycopg cannot load into a datetime ("infinity")
            return StoreRefused(message, reason=Refusal.DATA, operation=operation)
        return StoreRefused(message, operation=operation)
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return StoreUnavailable(message, operation=operation)
    return exc


# --------------------------------------------------------------------------- PostgREST

_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")
# PostgREST's own codes: PGRST0xx are its connection to the database (down,
# pool timeout, schema cache loading): transient.
_PGRST_UNAVAILABLE = re.compile(r"^PGRST0\d\d$")
_PGRST_MISSING = {"PGRST106", "PGRST202", "PGRST203", "PGRST204", "PGRST205"}
_PGRST_PERMISSION = re.compile(r"^PGRST3\d\d$")  # JWT: missing secret, expired, bad claims
# PGRST1xx (request), 2xx (schema cache) and 3xx (JWT) are about the request
# and final whatever the status; PGRSTX00 (internal) goes by its status.
_PGRST_REQUEST = re.compile(r"^PGRST[123]\d\d$")


def classify_http_error(status: int | None, code: str | None = None, message: str | None = None,
                        *, operation: str | None = None,
                        retry_after: float | None = None) -> StoreError:
    """A PostgREST answer (or no answer: status None) as StoreUnavailable or StoreRefused.

    The body's `code` decides when it is a SQLSTATE, because PostgREST answers
    500 for permanent errors too (internal error, raised exceptions, program
    limits) and 409 or 400 for a few transient ones.
    """
    text = message or (f"HTTP {status}" if status is not None else "no answer")
    shown = f"{operation}: " if operation else ""
    shown += f"HTTP {status} " if status is not None and message else ""
    shown += f"{code} " if code else ""
    shown = (shown + text)[:500]
    if status is None:
        return StoreUnavailable(shown, sqlstate=code, operation=operation, retry_after=retry_after)
    if code and _SQLSTATE.match(code) and not code.startswith("PGRST"):
        if sqlstate_is_transient(code):
            return StoreUnavailable(shown, sqlstate=code, status=status, operation=operation,
                                    retry_after=retry_after)
        return StoreRefused(shown, reason=refusal_of(code), sqlstate=code, status=status,
                            operation=operation)
    if code and _PGRST_UNAVAILABLE.match(code):
        return StoreUnavailable(shown, sqlstate=code, status=status, operation=operation,
                                retry_after=retry_after)
    if code in _PGRST_MISSING or (code and _PGRST_REQUEST.match(code) and status == 404):
        reason = Refusal.MISSING
    elif code and _PGRST_PERMISSION.match(code):
        reason = Refusal.PERMISSION
    elif code and _PGRST_REQUEST.match(code):
        reason = Refusal.OTHER
    elif status >= 500 or status in (408, 429):
        return StoreUnavailable(shown, sqlstate=code, status=status, operation=operation,
                                retry_after=retry_after)
    elif status == 404:
        reason = Refusal.MISSING
    elif status in (401, 403):
        reason = Refusal.PERMISSION
    elif status == 409:
        reason = Refusal.CONSTRAINT
    else:
        reason = Refusal.OTHER
    return StoreRefused(shown, reason=reason, sqlstate=code, status=status, operation=operation)
