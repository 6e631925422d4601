"""The store over a PostgreSQL connection: each method is one SQL function call."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool

from listener.instants import Instant, parse_instant, to_datetime
from listener.store import (
    ActionKey, Contacts, Fence, FireRequest, Fired, UnfinishedClaim)

PAGE = 5000


class SqlStore:
    def __init__(self, conninfo: str, *, min_size: int = 2, max_size: int = 10,
                 completed_since: Instant | None = None) -> None:
        self.pool = AsyncConnectionPool(
            conninfo, min_size=min_size, max_size=max_size, open=False,
            kwargs={"autocommit": True, "prepare_threshold": None})
        # Completed sessions ended before this may be left out of sweeps: every
        # episode they could owe is past emailing.
        self.completed_since = completed_since

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=15)

    async def close(self) -> None:
        await self.pool.close()

    async def _one(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> Any:
        async with self.pool.connection() as conn:
            cur = await conn.cursor(row_factory=tuple_row).execute(sql, params)
            row = await cur.fetchone()
            return None if row is None else row[0]

    async def _all(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        async with self.pool.connection() as conn:
            cur = await conn.cursor(row_factory=tuple_row).execute(sql, params)
            return [r[0] for r in await cur.fetchall()]

    async def ping(self) -> bool:
        return await self._one("select true", ()) is True

    async def tracked_pages(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of tracked rows; the next page is fetched while the caller digests
        this one (at start-up, 100,000 rows: the wait and the parsing overlap)."""
        since = None if self.completed_since is None else to_datetime(self.completed_since)
        ahead = asyncio.ensure_future(self._page(None, since))
        try:
            while True:
                page = await ahead
                full = len(page) == PAGE
                if full:
                    ahead = asyncio.ensure_future(self._page(page[-1]["id"], since))
                yield page
                if not full:
                    return
        finally:
            ahead.cancel()

    async def _page(self, after: str | None, since: Any) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.cursor(row_factory=dict_row).execute(
                "select * from public.listener_tracked_sessions(%s, %s, %s)", (after, PAGE, since))
            return await cur.fetchall()

    async def read_session(self, session_id: str) -> dict[str, Any] | None:
        return await self._one("select public.listener_read_session(%s)", (session_id,))

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        from psycopg.types.json import Jsonb

        key = request.key
        result = await self._one(
            "select public.listener_fire(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (key.rule, key.session_id, to_datetime(key.due_at), fence.holder, fence.token,
             to_datetime(request.fired_at), request.version,
             None if request.expected is None else list(request.expected),
             request.status, request.reason, request.finish, request.lateness_ms,
             Jsonb(request.detail or {})))
        return fired_from_json(result)

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any]) -> bool:
        from psycopg.types.json import Jsonb

        return bool(await self._one(
            "select public.listener_complete(%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (key.rule, key.session_id, to_datetime(key.due_at), fence.holder, fence.token,
             outcome, to_datetime(fired_at), lateness_ms, Jsonb(detail))))

    async def unfinished_claims(self) -> list[UnfinishedClaim]:
        rows = await self._all("select public.listener_unfinished_claims(%s)", ("0",))
        return [unfinished_from_json(r) for r in rows]

    async def contacts(self, session_id: str) -> Contacts:
        row = await self._one("select public.listener_session_contacts(%s)", (session_id,))
        return Contacts(**(row or {}))

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        return await self._one("select public.listener_lease_acquire(%s, %s)",
                               (holder, int(ttl_seconds * 1000)))

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        return bool(await self._one("select public.listener_lease_renew(%s, %s, %s)",
                                    (fence.holder, fence.token, int(ttl_seconds * 1000))))

    async def release_lease(self, fence: Fence) -> None:
        await self._one("select public.listener_lease_release(%s, %s)",
                        (fence.holder, fence.token))


def unfinished_from_json(row: dict[str, Any]) -> UnfinishedClaim:
    """The JSON of listener_unfinished_claims (SQL and RPC alike) as a claim."""
    return UnfinishedClaim(
        ActionKey(row["rule"], str(row["session_id"]), parse_instant(row["due_at"])),
        bool(row["status_applied"]), int(row["attempts"]), parse_instant(row.get("fired_at")))


def fired_from_json(result: dict[str, Any]) -> Fired:
    """The JSON of listener_fire (SQL and RPC alike)."""
    return Fired(result["outcome"], bool(result.get("status_applied", False)),
                 int(result.get("attempts", 1)), result.get("row"))
