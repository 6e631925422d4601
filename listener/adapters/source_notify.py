"""Changes by PostgreSQL LISTEN/NOTIFY (the trigger of migrations/0004_notify.sql)."""
from __future__ import annotations

import asyncio

import orjson
import psycopg
import structlog

from listener import metrics
from listener.changes import BadChange, Change, change_from_payload
from listener.sessions import BadRow, session_id_of
from listener.source import Backoff, ChangeSink

log = structlog.get_logger("listener.source")
CHANNEL = "listener_sessions"


def change_from_notify(payload: str) -> Change:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BadChange(f"not JSON ({exc})") from None
    if isinstance(obj, dict) and obj.get("truncated"):
        # The row did not fit in a NOTIFY: the daemon reads it.
        try:
            return Change(obj.get("type") or "UPDATE", session_id_of(obj), None)
        except BadRow as exc:
            raise BadChange(str(exc)) from None
    return change_from_payload(obj)


class NotifySource:
    name = "notify"

    def __init__(self, conninfo: str, *, idle_probe: float = 10.0, probe_timeout: float = 5.0,
                 channel: str = CHANNEL) -> None:
        self.conninfo = conninfo
        self.idle_probe = idle_probe
        self.probe_timeout = probe_timeout
        self.channel = channel
        self.backoff = Backoff()

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
                    self._deliver(sink, notify.payload)
                await asyncio.wait_for(conn.execute("select 1"), self.probe_timeout)

    @staticmethod
    def _deliver(sink: ChangeSink, payload: str) -> None:
        try:
            change = change_from_notify(payload)
        except BadChange as exc:
            sink.bad_input("notify_payload", f"{exc}: {payload[:200]!r}")
            return
        sink.put(change)
