"""An aiohttp application served from a thread of its own, with its own event
loop, so a test server's timing does not depend on the test's loop (a test
that blocks its loop must not stall the server it is talking to).

Subclasses build their routes in `routes(app)`; `start()` / `stop()` or
`with Server(...) as server:`; bound to `host` on a free port unless one is
given.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, TypeVar

from aiohttp import web

Self = TypeVar("Self", bound="ThreadedServer")


class ThreadedServer:
    thread_name = "test-server"
    app_options: dict[str, Any] = {}

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def before_stop(self) -> None:
        """Called on the test's thread before the server shuts down."""

    def start(self: Self) -> Self:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=self.thread_name,
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_serving(), loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self.before_stop()
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self: Self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start_serving(self) -> None:
        app = web.Application(**self.app_options)
        self.routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
