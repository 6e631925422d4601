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
from datetime import timedelta
from typing import Any, Mapping, Protocol

# The function whose presence says the audit's migration is applied.
PROBE_FUNCTION = "listener_audit_overdue_v1"
PROBE_SIGNATURE = "public.listener_audit_overdue_v1(jsonb,interval,integer)"
QUERY_CANCELED = "57014"  # statement timeout (or a cancel)


class AuditUnavailable(Exception):
    """The audit cannot run at all: no connection, or no migrations. One line."""


class AuditTimeout(Exception):
    """One call ran past the statement timeout."""


class AuditSource(Protocol):
    def call(self, function: str, params: Mapping[str, Any], *, scalar: bool = False) -> Any:
        """Rows as dicts (set-returning functions) or the value (scalar ones).
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

    @staticmethod
    def _adapt(value: Any) -> Any:
        from psycopg.types.json import Jsonb

        if isinstance(value, dict):
            return Jsonb(value)
        return value

    def call(self, function: str, params: Mapping[str, Any], *, scalar: bool = False) -> Any:
        import psycopg
        from psycopg import sql

        args = sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder())
            for name in params)
        target = sql.SQL("{}.{}({})").format(sql.Identifier("public"),
                                              sql.Identifier(function), args)
        query = (sql.SQL("select {} as value").format(target) if scalar
                 else sql.SQL("select * from {}").format(target))
        values = [self._adapt(v) for v in params.values()]
        try:
            self.conn.execute("savepoint audit_call")
            cursor = self.conn.execute(query, values)
            rows = cursor.fetchall()
            self.conn.execute("release savepoint audit_call")
        except psycopg.errors.QueryCanceled as exc:
            self.conn.execute("rollback to savepoint audit_call")
            raise AuditTimeout(str(exc).strip().splitlines()[0]) from None
        except psycopg.Error as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AuditUnavailable(f"public.{function}: {first}") from None
        return rows[0]["value"] if scalar else rows

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
            self.call(PROBE_FUNCTION, {"p_query": {"table": "-", "conditions": []},
                                       "p_grace": "0 seconds", "p_sample": 0})
        except AuditUnavailable:
            self.close()
            raise

    @staticmethod
    def _adapt(value: Any) -> Any:
        if isinstance(value, timedelta):
            return f"{value.total_seconds()} seconds"
        return value

    def call(self, function: str, params: Mapping[str, Any], *, scalar: bool = False) -> Any:
        import httpx

        body = {name: self._adapt(value) for name, value in params.items()}
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
            return None if scalar else []
        return response.json()

    def close(self) -> None:
        self.http.close()
