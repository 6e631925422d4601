"""The store over a PostgreSQL connection: each method is one SQL function call
(listener/adapters/calls.py), with named arguments."""
from __future__ import annotations

import json
from typing import Any, Mapping

import orjson
import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from listener.adapters.calls import PAGE, Call, CallingStore
from listener.errors import classify_db_error
from listener.rules.model import Recipient
from listener.rules.query import TableQuery


def loads_json(data: bytes | str) -> Any:
    """jsonb answers as json.loads reads them, at orjson's speed.

    A sweep page is one jsonb value of up to thousands of rows, parsed on the
    event loop. orjson refuses numbers beyond a double: such a page (an
    extreme value in some column) is read by json.loads, so one bad column
    stays one bad column. (orjson reads integers beyond 64 bits as floats: no
    rule reads such a number as one.)
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(loads_json, conn)


class SqlStore(CallingStore):
    def __init__(self, conninfo: str, queries: Mapping[str, TableQuery] | None = None, *,
                 recipients: Mapping[str, Mapping[str, Recipient]] | None = None,
                 min_size: int = 2, max_size: int = 10, page: int = PAGE) -> None:
        # The queries may come later (Backend.use), once the rules are activated.
        super().__init__(queries or {}, recipients=recipients, page=page)
        self.pool = AsyncConnectionPool(
            conninfo, min_size=min_size, max_size=max_size, open=False, configure=_configure,
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
