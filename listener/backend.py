"""What a backend is made of, shared by the adapters and the composition root."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from listener.rules.query import TableQuery
from listener.source import ChangeSource


class ConfigError(Exception):
    """Bad configuration: the message is the one line `run` exits with."""


@dataclass
class Backend:
    name: str
    store: Any
    source: ChangeSource
    conninfo: str | None = None
    closers: list[Any] = field(default_factory=list)

    def use(self, queries: dict[str, TableQuery]) -> None:
        """Read and follow these tables (the rules as active in this database)."""
        self.store.queries = dict(queries)
        use = getattr(self.source, "use", None)
        if use is not None:
            use(queries)

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result
