"""How `listener audit` calls its database functions: over SQL (psycopg) or
over Supabase's PostgREST RPC, with the same function names and parameters.

Over SQL the whole audit is ONE read-only transaction with a statement
timeout; each call runs in its own savepoint, so a call that times out costs
only its own figures. Over RPC each call is a request of its own: the
functions are STABLE, which PostgREST runs in a read-only transaction, and
their own `statement_timeout` setting bounds them there.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Protocol

from listener.adapters.calls import AUDIT_OVERDUE, Call, Shape

# The function whose presence says the audit's migration is applied.
PROBE_SIGNATURE = f"public.{AUDIT_OVERDUE.function}(jsonb,interval,integer)"
QUERY_CANCELED = "57014"  # statement timeout (or a cancel)


class AuditUnavailable(Exception):
    """The audit cannot run at all: no connection, or no migrations. One line."""


class AuditTimeout(Exception):
    """One call ran past the statement timeout."""


class AuditSource(Protocol):
    def call(self, call: Call, args: Mapping[str, Any]) -> Any:
        """Rows as dicts (a set-returning function) or the value (the others).
        Raises AuditTimeout on a statement timeout."""

    def close(self) -> None: ...


def _not_migrated() -> AuditUnavailable:
    return AuditUnavailable("the database lacks the listener's migrations: run `listener migrate`")


class SqlAuditSource:
    def __init__(self, conninfo: str, statement_timeout_ms: int) -> None:
        import psycopg
        from psycopg.rows import dict_row

        try:
            self.conn = psycopg.connect(conninfo, autocommit=True, row_factory=dict_row,
                                        connect_timeout=10)
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AuditUnavailable(f"cannot connect to the database: {first}") from None
        self.conn.execute("begin isolation level repeatable read read only")
        # Every statement of the transaction gets this budget.
        self.conn.execute(f"set local statement_timeout = {int(statement_timeout_ms)}")
        present = self.conn.execute("select to_regprocedure(%s) is not null as present",
                                    (PROBE_SIGNATURE,)).fetchone()
        if not present["present"]:
            self.close()
            raise _not_migrated()

    def call(self, call: Call, args: Mapping[str, Any]) -> Any:
        import psycopg

        function = call.function
        try:
            self.conn.execute("savepoint audit_call")
            cursor = self.conn.execute(call.sql(args), call.sql_args(args))
            rows = cursor.fetchall()
            self.conn.execute("release savepoint audit_call")
        except psycopg.errors.QueryCanceled as exc:
            self.conn.execute("rollback to savepoint audit_call")
            raise AuditTimeout(str(exc).strip().splitlines()[0]) from None
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AuditUnavailable(f"public.{function}: {first}") from None
        if call.shape is Shape.ROWS:
            return rows
        return next(iter(rows[0].values())) if rows else None

    def close(self) -> None:
        if not self.conn.closed:
            try:
                self.conn.execute("rollback")  # it only read
            finally:
                self.conn.close()


class RpcAuditSource:
    """PostgREST: POST /rest/v1/rpc/<function> with the service role key."""

    def __init__(self, url: str, key: str, timeout_s: float) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=url.rstrip("/") + "/rest/v1/rpc/",
            headers={"apikey": key, "Authorization": f"Bearer {key}",
                     "Content-Type": "application/json", "Accept": "application/json"},
            timeout=timeout_s)
        try:
            self.call(AUDIT_OVERDUE, {"p_query": {"table": "-", "conditions": []},
                                      "p_grace": "0 seconds", "p_sample": 0})
        except AuditUnavailable:
            self.close()
            raise

    def call(self, call: Call, args: Mapping[str, Any]) -> Any:
        import httpx

        function = call.function
        body = call.json_args(args)
        try:
            response = self.http.post(function, content=json.dumps(body, default=str))
        except httpx.HTTPError as exc:
            raise AuditUnavailable(f"cannot reach Supabase: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            try:
                error = response.json()
            except ValueError:
                error = {}
            code = error.get("code") if isinstance(error, dict) else None
            if code == QUERY_CANCELED:
                raise AuditTimeout(str(error.get("message")))
            if code == "PGRST202" or response.status_code == 404:
                raise _not_migrated()
            message = error.get("message") if isinstance(error, dict) else None
            raise AuditUnavailable(
                f"public.{function}: HTTP {response.status_code} {code or ''} "
                f"{message or response.text[:200]}".replace("  ", " "))
        if response.status_code == 204 or not response.content:
            return [] if call.shape is Shape.ROWS else None
        return response.json()

    def close(self) -> None:
        self.http.close()
