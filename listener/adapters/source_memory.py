"""A change source in memory: what a test, a replay or a demo pushes into it
reaches the daemon as a real source's changes do.

It feeds the ChangeSink the way the NOTIFY and Realtime sources do: `subscribed`
once the daemon runs it (and after every reconnect, so the daemon sweeps),
`put` for each change, `bad_input` for a payload it cannot read,
`unsubscribed` when the stream is lost. And it can be made to fail as they
fail: `reconnect()` loses the subscription and subscribes again (a change
pushed meanwhile is lost: nothing replays), `drop(key)` loses a row's changes
while the stream looks healthy.

Written with a MemoryStore, `write` and `remove` change the store's rows and
push the change in one step, as a database's trigger would.
"""
from __future__ import annotations

import asyncio
from typing import Any, Mapping

from listener.adapters.store_memory import MemoryStore
from listener.changes import BadChange, Change, ChangeType, change_from_payload
from listener.clock import Clock, WallClock
from listener.rows import key_text
from listener.rules.query import TableQuery
from listener.source import BadInputKind, ChangeSink


class MemorySource:
    name = "memory"

    def __init__(self, store: MemoryStore | None = None, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or (store.clock if store is not None else WallClock())
        self.key_columns: dict[str, str] | None = None
        self._sink: ChangeSink | None = None
        self._live = asyncio.Event()  # subscribed: pushed changes reach the sink
        self.dropping: set[str] = set()  # keys whose changes are lost
        self.delivered: list[Change] = []
        self.lost: list[Change] = []  # dropped, or pushed while not subscribed

    def use(self, queries: Mapping[str, TableQuery]) -> None:
        """Follow these tables (the rules as active): others' changes are not delivered."""
        self.key_columns = {t: q.key for t, q in queries.items()}

    # -- the ChangeSource port -------------------------------------------------------

    async def run(self, sink: ChangeSink) -> None:
        self._sink = sink
        try:
            self._subscribe()
            await asyncio.Future()  # until cancelled, as a real stream
        finally:
            self._sink = None
            self._live.clear()

    # -- what the stream does ---------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        return self._live.is_set()

    async def wait_subscribed(self) -> None:
        await self._live.wait()

    def _subscribe(self) -> None:
        assert self._sink is not None
        self._live.set()
        self._sink.subscribed(self.name)

    def disconnect(self, reason: str = "memory source disconnected") -> None:
        """The subscription is lost; changes pushed until `connect()` are lost too."""
        if self._sink is not None and self._live.is_set():
            self._live.clear()
            self._sink.unsubscribed(self.name, reason)

    def connect(self) -> None:
        """Subscribed again: the daemon sweeps for what it may have missed."""
        if self._sink is not None and not self._live.is_set():
            self._subscribe()

    def reconnect(self, reason: str = "memory source reconnected") -> None:
        self.disconnect(reason)
        self.connect()

    def drop(self, key: str) -> None:
        """Lose every change of this row from now on, as a healthy-looking socket
        can lose a frame; `deliver_again(key)` ends it."""
        self.dropping.add(key)

    def deliver_again(self, key: str) -> None:
        self.dropping.discard(key)

    # -- pushing changes --------------------------------------------------------------

    def push(self, change: Change) -> bool:
        """Deliver one change; False when it was lost (dropped, or not subscribed)."""
        if self.key_columns is not None and change.table not in self.key_columns:
            return False  # a table no active rule reads, as the real sources filter
        if self._sink is None or not self._live.is_set() or change.key in self.dropping:
            self.lost.append(change)
            return False
        self.delivered.append(change)
        self._sink.put(change)
        return True

    def push_payload(self, payload: Any) -> bool:
        """A raw change ({"type", "table", "record" | "old_record"}), validated as
        the real sources validate theirs: one that cannot be read is reported to
        the daemon as bad input, and False returned."""
        try:
            change = change_from_payload(payload, key_columns=self.key_columns)
        except BadChange as exc:
            if self._sink is not None:
                self._sink.bad_input(BadInputKind.MEMORY_PAYLOAD, f"{exc}: {str(payload)[:200]!r}")
            return False
        return self.push(change)

    def write(self, table: str, record: dict[str, Any]) -> dict[str, Any]:
        """Write a row into the store and push its change; the row as stored."""
        store = self._store()
        key_column = self.key_columns.get(table, "id") if self.key_columns else "id"
        existed = key_text(record.get(key_column)) in store.tables.get(table, {})
        row = store.write(table, record, self.clock.now())
        kind = ChangeType.UPDATE if existed else ChangeType.INSERT
        self.push(Change(kind, table, str(key_text(row.get(key_column))), dict(row)))
        return row

    def remove(self, table: str, key: str) -> None:
        """Delete a row from the store and push the delete."""
        self._store().remove(table, key)
        self.push(Change(ChangeType.DELETE, table, key, None))

    def _store(self) -> MemoryStore:
        if self.store is None:
            raise TypeError("MemorySource without a MemoryStore: push changes instead")
        return self.store
