"""Where a report's figures come from, for the command line and the ops endpoint.

A figure source is an async callable ``(since, until) -> figures``: over a SQL
connection (DATABASE_URL, the embedded database) or over supabase-py's RPC.
The actions due next and the audit's findings are the caller's: only the
daemon's rule evaluation knows what is due, only the audit what is missing.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Mapping

from listener.instants import DAY, Instant
from listener.report.figures import assemble, figures_over_rpc, figures_over_sql, window
from listener.report.formats import ReportFormat, render

FigureSource = Callable[[Instant, Instant], Awaitable[dict[str, Any]]]
Upcoming = Callable[[Instant], Iterable[Mapping[str, Any]]]

UPCOMING_HORIZON = DAY  # the report lists what is due in the next 24 hours


def sql_source(conninfo: str) -> FigureSource:
    async def figures(since: Instant, until: Instant) -> dict[str, Any]:
        return await figures_over_sql(conninfo, since, until)
    return figures


def rpc_source(client: Any) -> FigureSource:
    async def figures(since: Instant, until: Instant) -> dict[str, Any]:
        return await figures_over_rpc(client, since, until)
    return figures


@asynccontextmanager
async def supabase_client(url: str, key: str) -> AsyncIterator[Any]:
    """supabase-py's async client on an HTTP client closed on the way out."""
    import httpx
    from supabase import AsyncClientOptions, acreate_client

    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0),
                                 follow_redirects=True) as http:
        options = AsyncClientOptions(httpx_client=http, auto_refresh_token=False,
                                     persist_session=False)
        yield await acreate_client(url, key, options)


async def build_report(source: FigureSource, since: Instant, until: Instant, *,
                       upcoming: Iterable[Mapping[str, Any]] = (),
                       findings: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    return assemble(await source(since, until), upcoming, findings)


def ops_page(source: FigureSource, now: Callable[[], Instant], *, length: int = 7 * DAY,
             upcoming: Upcoming | None = None,
             form: ReportFormat = ReportFormat.HTML) -> Callable[[], Awaitable[str]]:
    """What the ops endpoint's /report serves: the last ``length`` up to now.

    ``upcoming(now)`` (the daemon's armed timers, for instance) gives the
    actions due in the next 24 hours as {at, rule, table, row_id}.
    """
    async def page() -> str:
        since, until = window(now(), length)
        due = list(upcoming(until)) if upcoming is not None else []
        return render(await build_report(source, since, until, upcoming=due), form)
    return page
