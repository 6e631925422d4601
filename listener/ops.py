"""Ops endpoint: /healthz, /readyz, /metrics and /report on an optional port.

Off unless ``OPS_PORT`` is set; binds loopback (``OPS_HOST``, default
127.0.0.1) unless told otherwise. Served by aiohttp on the daemon's own event
loop, so a blocked loop shows up as a failing (or unanswered) /healthz.

The daemon's parts publish facts into a :class:`Readiness` (the lease role,
the source's subscription, each store call's outcome); readiness is computed
from those facts. The server only reads it, apart from ``last_loop_tick``
which its heartbeat task bumps every second.

/report (the operations report page) exists only when both a token
(``OPS_TOKEN``) and a page producer are given: without them the route is not
registered, so it answers exactly like any unknown path.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from listener.metrics import REGISTRY

log = structlog.get_logger("listener")

if TYPE_CHECKING:
    from listener.settings import Settings

ROLES = ("starting", "active", "standby", "stopping")
SERVING_ROLES = frozenset({"active", "standby"})

DEFAULT_HOST = "127.0.0.1"
HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeat ticks
STALE_AFTER = 5.0  # /healthz fails once the last tick is older than this

ReportPage = Callable[[], Awaitable[str]]
# The page is self-contained: forbid everything it does not use, including any
# script a value from the database might smuggle past escaping.
REPORT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


class Readiness:
    """What the daemon knows about itself, read by /healthz and /readyz.

    ``role`` is one of ``starting`` (before the first lease attempt),
    ``active`` (holding the lease), ``standby`` (another instance holds it)
    and ``stopping`` (SIGTERM received). ``last_loop_tick`` is in
    ``time.monotonic()`` seconds.
    """

    __slots__ = ("source_subscribed", "store_failures", "last_store_error", "store_answered",
                 "_role", "last_loop_tick")

    def __init__(self, *, source_subscribed: bool = False, database_reachable: bool = False,
                 role: str = "starting", last_loop_tick: float | None = None) -> None:
        self.source_subscribed = source_subscribed
        self.store_failures = 0  # consecutive "unavailable" answers since the last success
        self.last_store_error: str | None = None
        self.store_answered = database_reachable  # the store has answered at least once
        self.role = role
        self.last_loop_tick = time.monotonic() if last_loop_tick is None else last_loop_tick

    # -- the store's facts: reachable is "answered, and not failing since" ----------------

    @property
    def database_reachable(self) -> bool:
        return self.store_answered and self.store_failures == 0

    @database_reachable.setter
    def database_reachable(self, value: bool) -> None:
        if value:
            self.store_ok()
        else:
            self.store_down(None)

    def store_ok(self) -> None:
        self.store_answered = True
        self.store_failures = 0
        self.last_store_error = None

    def store_down(self, exc: BaseException | None) -> None:
        self.store_failures += 1
        self.last_store_error = (str(exc)[:300] or type(exc).__name__) if exc else "unreachable"

    @property
    def role(self) -> str:
        return self._role

    @role.setter
    def role(self, value: str) -> None:
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {value!r}")
        self._role = value

    def tick(self, now: float | None = None) -> None:
        self.last_loop_tick = time.monotonic() if now is None else now

    def loop_age(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat tick."""
        return (time.monotonic() if now is None else now) - self.last_loop_tick

    def loop_alive(self, stale_after: float = STALE_AFTER, now: float | None = None) -> bool:
        return self.loop_age(now) <= stale_after

    def checks(self) -> dict[str, bool]:
        return {
            "source_subscribed": self.source_subscribed,
            "database_reachable": self.database_reachable,
            "lease": self.role in SERVING_ROLES,
        }

    def ready(self) -> bool:
        return all(self.checks().values())

    def __repr__(self) -> str:
        return (f"Readiness(source_subscribed={self.source_subscribed}, "
                f"database_reachable={self.database_reachable}, role={self.role!r}, "
                f"last_loop_tick={self.last_loop_tick:.3f})")


class OpsServer:
    """aiohttp server for the ops routes. ``start()`` returns the bound port."""

    def __init__(self, readiness: Readiness, host: str | None = DEFAULT_HOST, port: int = 0, *,
                 registry: CollectorRegistry = REGISTRY,
                 heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 stale_after: float = STALE_AFTER,
                 report: ReportPage | None = None, token: str | None = None) -> None:
        self.readiness = readiness
        self.report = report
        self._token = token.encode() if token else None
        # One report at a time: a reloading browser must not stack queries.
        self._report_lock = asyncio.Lock()
        self.host = host or DEFAULT_HOST
        self.requested_port = port
        self.registry = registry
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, readiness: Readiness,
                      report: ReportPage | None = None) -> OpsServer | None:
        """The server ``OPS_PORT``/``OPS_HOST`` ask for, or None when OPS_PORT is unset;
        /report served by ``report`` when ``OPS_TOKEN`` is set."""
        if settings.ops_port is None:
            return None
        token = settings.ops_token.get_secret_value() if settings.ops_token else None
        return cls(readiness, host=settings.ops_host, port=settings.ops_port, report=report,
                   token=token)

    @property
    def serves_report(self) -> bool:
        return self._token is not None and self.report is not None

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self.serves_report:
            app.router.add_get("/report", self._report)
        return app

    async def start(self) -> int:
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        self.readiness.tick()
        # access_log=None: probes every few seconds would drown the JSON logs.
        # handle_signals=False (the default): SIGTERM belongs to the daemon.
        # shutdown_timeout: stop() must fit in the daemon's 10 s SIGTERM budget.
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._heartbeat = asyncio.create_task(self._beat(), name="ops-heartbeat")
        return self.port

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> OpsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def _beat(self) -> None:
        while True:  # start() gave the first tick
            await asyncio.sleep(self.heartbeat_interval)
            self.readiness.tick()

    async def _healthz(self, request: web.Request) -> web.Response:
        age = self.readiness.loop_age()
        heartbeat_running = self._heartbeat is not None and not self._heartbeat.done()
        if age <= self.stale_after and heartbeat_running:
            return web.json_response({"status": "ok", "loop_lag_s": round(age, 3)})
        return web.json_response(
            {"status": "stalled", "loop_lag_s": round(age, 3), "heartbeat": heartbeat_running},
            status=503)

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = self.readiness.checks()
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", "role": self.readiness.role,
                "checks": checks}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # The library's own negotiation, as in its WSGI/ASGI apps: the classic
        # text format (version 0.0.4) unless the scraper asks for OpenMetrics
        # or text version 1.0.0 in Accept.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    def _authorised(self, request: web.Request) -> bool:
        assert self._token is not None
        offered = request.query.get("token")
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            offered = credentials.strip()
        if not offered:
            return False
        return hmac.compare_digest(offered.encode(), self._token)

    async def _report(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.Response(status=401, text="401: a valid token is required\n",
                                headers={"WWW-Authenticate": 'Bearer realm="listener"',
                                         "Cache-Control": "no-store"})
        assert self.report is not None
        try:
            async with self._report_lock:
                page = await self.report()
        except Exception as exc:  # noqa: BLE001 - the daemon keeps running; say why here
            log.warning("report_failed", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            return web.Response(status=503, text="503: the report could not be gathered\n",
                                headers={"Cache-Control": "no-store"})
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            headers=REPORT_HEADERS)
