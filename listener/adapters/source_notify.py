"""Changes by PostgreSQL LISTEN/NOTIFY: the trigger listener_watch_v1 installs on
every watched table notifies channel `listener_changes`."""
from __future__ import annotations

import asyncio
from typing import Mapping

import orjson
import psycopg
import structlog

from listener import metrics
from listener.changes import BadChange, Change, change_from_payload, key_of
from listener.rules.query import TableQuery
from listener.source import Backoff, BadInputKind, ChangeSink

log = structlog.get_logger("listener.source")
CHANNEL = "listener_changes"


def change_from_notify(payload: str, key_columns: Mapping[str, str] | None = None) -> Change:
    """{"type", "table", "record"} (INSERT, UPDATE), {"type", "table", "old_record"}
    (DELETE) or {"type", "table", "key", "truncated": true} (the row did not
    fit in a NOTIFY: the daemon reads it)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadChange(f"not JSON ({exc})") from None
    if isinstance(obj, dict) and obj.get("truncated"):
        table = obj.get("table")
        if not isinstance(table, str) or not table:
            raise BadChange("truncated change without a table")
        kind = obj.get("type") if obj.get("type") in ("INSERT", "UPDATE", "DELETE") else "UPDATE"
        return Change(kind, table, key_of(obj, "key", table), None)
    return change_from_payload(obj, key_columns=key_columns)


class NotifySource:
    name = "notify"

    def __init__(self, conninfo: str, queries: Mapping[str, TableQuery] | None = None, *,
                 idle_probe: float = 10.0, probe_timeout: float = 5.0,
                 channel: str = CHANNEL) -> None:
        self.conninfo = conninfo
        # Only the watched tables' changes are delivered; a trigger left on a
        # table no rule reads any more is ignored.
        self.key_columns = None if queries is None else {t: q.key for t, q in queries.items()}
        self.idle_probe = idle_probe
        self.probe_timeout = probe_timeout
        self.channel = channel
        self.backoff = Backoff()

    def use(self, queries: Mapping[str, TableQuery]) -> None:
        """Follow these tables (the rules as active in this database)."""
        self.key_columns = {t: q.key for t, q in queries.items()}

    async def run(self, sink: ChangeSink) -> None:
        while True:
            try:
                await self._session(sink)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                sink.unsubscribed(self.name, repr(exc))
                metrics.SOURCE_RECONNECTS.labels(self.name).inc()
                delay = await self.backoff.sleep()
                log.info("source_reconnecting", source=self.name, after_s=round(delay, 2))

    async def _session(self, sink: ChangeSink) -> None:
        # TCP keepalives find a dead peer; the idle probe finds a stalled one.
        conn = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, keepalives=1, keepalives_idle=10,
            keepalives_interval=5, keepalives_count=3, connect_timeout=10)
        async with conn:
            await conn.execute(f"LISTEN {self.channel}")
            self.backoff.reset()
            log.info("source_subscribed", source=self.name, channel=self.channel)
            sink.subscribed(self.name)
            while True:
                async for notify in conn.notifies(timeout=self.idle_probe):
                    self.deliver(sink, notify.payload)
                await asyncio.wait_for(conn.execute("select 1"), self.probe_timeout)

    def deliver(self, sink: ChangeSink, payload: str) -> None:
        try:
            change = change_from_notify(payload, self.key_columns)
        except BadChange as exc:
            sink.bad_input(BadInputKind.NOTIFY_PAYLOAD, f"{exc}: {payload[:200]!r}")
            return
        if self.key_columns is not None and change.table not in self.key_columns:
            return
        sink.put(change)
