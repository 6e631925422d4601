"""The store over a PostgreSQL connection: each method is one SQL function call
(listener/adapters/calls.py), with named arguments."""
from __future__ import annotations

from typing import Any, Mapping

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from listener.adapters.calls import PAGE, Call, CallingStore
from listener.errors import classify_db_error
from listener.rules.model import Recipient
from listener.rules.query import TableQuery


class SqlStore(CallingStore):
    def __init__(self, conninfo: str, queries: Mapping[str, TableQuery] | None = None, *,
                 recipients: Mapping[str, Mapping[str, Recipient]] | None = None,
                 min_size: int = 2, max_size: int = 10, page: int = PAGE) -> None:
        # The queries may come later (Backend.use), once the rules are activated.
        super().__init__(queries or {}, recipients=recipients, page=page)
        self.pool = AsyncConnectionPool(
            conninfo, min_size=min_size, max_size=max_size, open=False,
            kwargs={"autocommit": True, "prepare_threshold": None})

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=15)

    async def close(self) -> None:
        await self.pool.close()

    async def invoke(self, call: Call, args: dict[str, Any]) -> Any:
        # Driver errors become StoreUnavailable or StoreRefused here, at the edge:
        # the daemon branches on those, never on psycopg's classes.
        try:
            async with self.pool.connection() as conn:
                cur = await conn.cursor(row_factory=tuple_row).execute(call.sql(),
                                                                       call.sql_args(args))
                row = await cur.fetchone()
                return None if row is None else row[0]
        except (psycopg.Error, PoolTimeout, OSError, TimeoutError) as exc:
            raise classify_db_error(exc, operation=call.function) from exc

    async def ping(self) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute("select true")
            row = await cur.fetchone()
            return row is not None and row[0] is True
