"""Running the real daemon on the Supabase backend (RpcStore + RealtimeSource)
against the Realtime and PostgREST test servers, fed by a real database."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import psycopg

from listener.adapters.supabase import RealtimeSource, RpcStore
from listener.source import Backoff
from listener.instants import HOUR
from listener.rules import load_rules
from listener.rules.query import table_queries
from listener.runtime import recipients_of
from tests.live import FAST, LiveDaemon, eventually, seed_people
from tests.servers.postgrest_server import SERVICE_ROLE_KEY, SupabaseStack, setup_supabase_roles

# The migrations whose grants name the API roles: re-run once the roles exist
# (each file is idempotent: `create ... if not exists`, `create or replace`).
GRANTING = ("0002_ledger_and_lease.sql", "0006_rows_of_any_table.sql", "0007_email_batches.sql",
            "0008_report.sql", "0009_audit.sql", "0010_lean_row_pages.sql")


async def prepare_supabase_database(conninfo: str) -> None:
    """A migrated database as on a Supabase project: the API roles exist, and the
    listener's tables and functions are granted to service_role only."""
    await setup_supabase_roles(conninfo)
    folder = resources.files("listener.migrations")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for name in GRANTING:
            conn.execute(folder.joinpath(name).read_text(encoding="utf-8"))


@contextlib.asynccontextmanager
async def supabase_stack(conninfo: str) -> AsyncIterator[SupabaseStack]:
    """The PostgREST and Realtime test servers over a database prepared as a
    Supabase project's, with the people the rules' emails go to."""
    seed_people(conninfo)
    await prepare_supabase_database(conninfo)
    async with SupabaseStack(conninfo) as stack:
        yield stack


class LiveSupabaseDaemon(LiveDaemon):
    """The real daemon, in process, on RpcStore + RealtimeSource; emails to an outbox."""

    def __init__(self, stack: SupabaseStack, outbox: Path, env: dict[str, str] | None = None,
                 holder: str | None = None, lease_ttl_s: float = 6.0,
                 reconcile_s: float = 60.0, rpc_timeout_s: float = 1.0,
                 source_options: dict[str, Any] | None = None,
                 store_options: dict[str, Any] | None = None) -> None:
        self.stack = stack
        rules = load_rules(env if env is not None else FAST)
        queries = table_queries(rules, HOUR)
        store = RpcStore(stack.url, SERVICE_ROLE_KEY, queries, recipients=recipients_of(rules),
                         timeout=httpx.Timeout(rpc_timeout_s),
                         **{"max_attempts": 6, "retry_initial_s": 0.1, "retry_max_s": 1.0,
                            **(store_options or {})})
        options = {"join_timeout": 2.0, "subscribed_timeout": 5.0, "join_grace": 5.0,
                   "watch_interval": 0.2, "stable_after": 5.0,
                   "backoff": Backoff(initial=0.1, maximum=1.0), **(source_options or {})}
        super().__init__(None, outbox, env, holder, lease_ttl_s, reconcile_s, store=store,
                         source=RealtimeSource(stack.url, SERVICE_ROLE_KEY, queries, **options))

    async def resubscribed(self, subscriptions: int, timeout: float = 20.0) -> None:
        """Wait for the source's n-th "Subscribed to PostgreSQL" and the sweep after it."""
        await eventually(lambda: self.source.subscriptions >= subscriptions
                         and self.daemon.readiness.source_subscribed
                         and self.daemon.events.active.is_set(), timeout)
