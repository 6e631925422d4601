"""Building the daemon's parts from the configuration (SPEC section 5)."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import psycopg
import structlog

from listener import migrate
from listener.settings import Settings
from listener.source import ChangeSource
from listener.rules.table import RuleTable

log = structlog.get_logger("listener")


class ConfigError(Exception):
    """Bad configuration: the message is the one line `run` exits with."""


@dataclass
class Backend:
    name: str
    store: Any
    source: ChangeSource
    conninfo: str | None = None
    closers: list[Any] = field(default_factory=list)

    async def close(self) -> None:
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result


def embedded_conninfo(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under data_dir and migrate it,
    the reference app schema included: it is a local, throwaway database."""
    import warnings

    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir it does not use here.
        warnings.simplefilter("ignore")
        import pgserver

        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(str((data_dir / "pg").resolve()), cleanup_mode="stop")
    conninfo = server.get_uri()
    migrate.apply(conninfo, include_reference=True)
    return conninfo


def check_database(conninfo: str) -> None:
    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"database unreachable: {first}") from None
    try:
        missing = migrate.missing(conninfo)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot read migrations: {str(exc).splitlines()[0]}") from None
    if missing:
        raise ConfigError(f"database lacks migrations {', '.join(missing)}: run `listener migrate`")


def database_conninfo(settings: Settings) -> str:
    if settings.backend == "postgres":
        assert settings.database_url is not None
        check_database(settings.database_url)
        return settings.database_url
    return embedded_conninfo(settings.listener_data_dir)


def completed_window(table: RuleTable, settings: Settings) -> int:
    """How long after its end a completed session may still owe an email."""
    longest = max((r.offset for r in table if "completed" in r.when.statuses), default=0)
    return longest + settings.max_notify_lateness


async def open_backend(settings: Settings, table: RuleTable, now: int) -> Backend:
    since = now - completed_window(table, settings)
    if settings.backend == "supabase":
        from listener.adapters.supabase import open_supabase_backend

        return await open_supabase_backend(settings, completed_since=since)
    from listener.adapters.source_notify import NotifySource
    from listener.adapters.store_sql import SqlStore

    conninfo = await asyncio.to_thread(database_conninfo, settings)
    store = SqlStore(conninfo, completed_since=since)
    try:
        await store.open()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"database unreachable: {exc}") from None
    return Backend(settings.backend, store, NotifySource(conninfo), conninfo, [store.close])


@contextlib.asynccontextmanager
async def effects(settings: Settings, table: RuleTable, store: Any,
                  identifier: str) -> AsyncIterator[tuple[Any, Any]]:
    """The email deliverer and the event publisher, per configuration."""
    from listener.emails import EmailComposer, EmailDeliverer
    from listener.mailer import Mailer

    closers: list[Any] = []
    if settings.resend_api_key is not None:
        from listener.adapters.email_resend import ResendSender

        sender: Any = ResendSender(settings.resend_api_key.get_secret_value(),
                                   settings.resend_api_url)
        closers.append(sender.aclose)
        log.info("email_via_resend", api_url=settings.resend_api_url or "default")
    else:
        if settings.backend == "supabase" and settings.email_outbox is None:
            raise ConfigError("RESEND_API_KEY is not set: set it, or set EMAIL_OUTBOX to a "
                              "folder to write emails there instead")
        from listener.adapters.email_outbox import OutboxSender

        folder = settings.email_outbox or settings.listener_data_dir / "outbox"
        sender = OutboxSender(folder)
        log.warning("email_to_outbox", folder=str(folder),
                    why="RESEND_API_KEY is not set: emails are written as files, not sent")
    if not settings.support_email:
        log.warning("no_support_email", why="SUPPORT_EMAIL is not set: support alerts will fail")
    mailer = Mailer(sender, rate_per_second=settings.resend_rate_limit,
                    max_attempts=settings.email_max_attempts)
    composer = EmailComposer(table, settings.next_public_app_url, settings.email_from,
                             settings.support_email)
    deliverer = EmailDeliverer(store, composer, mailer)
    publisher = None
    if settings.mqtt_url:
        from listener.adapters.mqtt import MqttPublisher

        try:
            publisher = MqttPublisher(settings.mqtt_url, identifier)
        except ValueError as exc:
            raise ConfigError(f"MQTT_URL: {exc}") from None
        await publisher.start()
        closers.append(publisher.close)
    try:
        yield deliverer, publisher
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()


def install_signal_handlers(stop: asyncio.Event) -> None:
    """First SIGTERM/SIGINT: graceful stop. A second one: exit at once."""
    import os
    import signal

    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second_signal", signal=signum, action="exiting now")
            os._exit(128 + signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def serve(settings: Settings, table: RuleTable, *, stop: asyncio.Event | None = None,
                on_result: Any = None, signals: bool = True) -> None:
    """`listener run`: the daemon on the configured backend until stopped."""
    from listener.clock import WallClock
    from listener.daemon import Daemon, DaemonConfig

    stop = stop or asyncio.Event()
    if signals:
        install_signal_handlers(stop)
    clock = WallClock()
    backend = await open_backend(settings, table, clock.now())
    config = DaemonConfig(lease_ttl=settings.lease_ttl,
                          reconcile_interval=settings.reconcile_interval,
                          max_notify_lateness=settings.max_notify_lateness,
                          holder=settings.instance_name or "")
    ops = None
    try:
        async with effects(settings, table, backend.store, config.holder) as (deliverer, publisher):
            from listener.ops import OpsServer, Readiness

            readiness = Readiness()
            if settings.ops_port is not None:
                ops = OpsServer(readiness, host=settings.ops_host, port=settings.ops_port)
                port = await ops.start()
                log.info("ops_listening", host=settings.ops_host, port=port)
            daemon = Daemon(table, backend.store, backend.source, clock, config,
                            deliverer=deliverer, publisher=publisher, readiness=readiness,
                            on_result=on_result)
            log.info("listener_started", backend=backend.name, holder=config.holder,
                     rules=len(table), time_scale=table.time_scale)
            await daemon.run(stop)
    finally:
        if ops is not None:
            await ops.stop()
        await backend.close()
        log.info("listener_stopped")
