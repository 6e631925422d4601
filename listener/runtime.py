"""The composition root: the one place a running listener is assembled from
settings and rules. `listener run`, `listener demo`, `plan`, `report`, the
tests and the benchmarks all build it here, so they run the same thing.

    settings, rules -> backend (store + change source) -> activation against the
    database's catalogue -> effects (email, webhooks, MQTT) -> Daemon
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import psycopg
import structlog

from listener import migrate
from listener.activation import Activation, ActivationError, TableInfo, activate
from listener.backend import Backend, ConfigError
from listener.clock import Clock
from listener.instants import HOUR
from listener.rules.model import RuleSet
from listener.rules.query import TableQuery, table_queries
from listener.settings import Settings

log = structlog.get_logger("listener")

__all__ = ["Backend", "ConfigError", "Listener", "assemble", "memory_backend", "open_backend",
           "serve"]


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
    return server.get_uri()


def check_database(conninfo: str, queries: dict[str, TableQuery]) -> None:
    try:
        with psycopg.connect(conninfo, connect_timeout=10) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"database unreachable: {first}") from None
    try:
        missing = migrate.missing(conninfo, queries)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot read migrations: {str(exc).splitlines()[0]}") from None
    if missing:
        raise ConfigError(f"database lacks migrations {', '.join(missing)}: run `listener migrate`")


def database_conninfo(settings: Settings, queries: dict[str, TableQuery]) -> str:
    """The PostgreSQL to use; the embedded one is migrated (with the reference
    app schema and the rules' per-table objects) on the way."""
    if settings.backend == "postgres":
        assert settings.database_url is not None
        check_database(settings.database_url, queries)
        return settings.database_url
    conninfo = embedded_conninfo(settings.listener_data_dir)
    migrate.apply(conninfo, include_reference=True, queries=queries)
    return conninfo


def recipients_of(ruleset: RuleSet) -> dict[str, Any]:
    """Table -> role -> Recipient: what the stores resolve contacts with."""
    return {name: table.recipients for name, table in ruleset.tables.items()}


async def open_backend(settings: Settings, queries: dict[str, TableQuery],
                       recipients: dict[str, Any] | None = None) -> Backend:
    """The store and the change source of the configured backend, opened."""
    if settings.backend == "supabase":
        from listener.adapters.supabase import open_supabase_backend

        return await open_supabase_backend(settings, queries, recipients)
    from listener.adapters.source_notify import NotifySource
    from listener.adapters.store_sql import SqlStore

    conninfo = await asyncio.to_thread(database_conninfo, settings, queries)
    store = SqlStore(conninfo, queries, recipients=recipients)
    try:
        await store.open()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"database unreachable: {exc}") from None
    return Backend(settings.backend, store, NotifySource(conninfo, queries), conninfo,
                   [store.close])


def memory_backend(ruleset: RuleSet, *, clock: Clock | None = None,
                   max_notify_lateness: int = HOUR, store: Any = None) -> Backend:
    """A backend with no database: the in-memory store (or `store`, a
    MemoryStore of the caller's) and a change source fed by hand, over the
    rules' tables. For tests, demos and a first look:

        backend = memory_backend(ruleset)
        async with assemble(settings, ruleset, backend=backend) as listener: ...
        backend.source.write("sessions", {"id": ..., "status": "pending"})
    """
    from listener.adapters.source_memory import MemorySource
    from listener.adapters.store_memory import MemoryStore

    if store is None:
        store = MemoryStore(clock=clock)
    store.queries = table_queries(ruleset, max_notify_lateness)
    store.recipients = recipients_of(ruleset)
    return Backend("memory", store, MemorySource(store, clock))


async def activation_of(backend: Backend, ruleset: RuleSet) -> Activation:
    """The rules as this database can run them."""
    tables = list(ruleset.watched_tables())
    raw = await backend.store.describe(tables)
    catalog = {name: TableInfo.from_json(raw.get(name)) for name in tables}
    try:
        return activate(ruleset, catalog)
    except ActivationError as exc:
        raise ConfigError(str(exc)) from None


async def describe_activity(settings: Settings, ruleset: RuleSet) -> dict[str, str]:
    """`listener rules`: "yes", or "no: why" per rule, in the configured database."""
    queries = table_queries(ruleset, settings.max_notify_lateness)
    backend = await open_backend(settings, queries, recipients_of(ruleset))
    try:
        found = await activation_of(backend, ruleset)
    finally:
        await backend.close()
    return {r.name: ("yes" if r.enabled else f"no: {found.inactive.get(r.name, 'disabled')}")
            for r in ruleset.all_rules}


@dataclass
class Effects:
    deliverer: Any = None
    publisher: Any = None
    webhooks: Any = None


@contextlib.asynccontextmanager
async def effects(settings: Settings, ruleset: RuleSet, store: Any, identifier: str, *,
                  sender: Any = None, publisher: Any = None,
                  rate_per_second: float | None = None,
                  mailer_options: dict[str, Any] | None = None) -> AsyncIterator[Effects]:
    """The email deliverer, the webhook sender and the event publisher, per
    configuration (or the ones given, for tests)."""
    from listener.emails import EmailComposer, EmailDeliverer
    from listener.mailer import Mailer

    closers: list[Any] = []
    if sender is None and settings.resend_api_key is not None:
        from listener.adapters.email_resend import ResendSender

        sender = ResendSender(settings.resend_api_key.get_secret_value(),
                              settings.resend_api_url)
        closers.append(sender.aclose)
        log.info("email_via_resend", api_url=settings.resend_api_url or "default")
    elif sender is None:
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
    mailer = Mailer(sender, rate_per_second=rate_per_second or settings.resend_rate_limit,
                    max_attempts=settings.email_max_attempts, **(mailer_options or {}))
    composer = EmailComposer.from_settings(settings, ruleset)
    found = Effects(EmailDeliverer(store, composer, mailer))
    from listener.webhooks import WebhookSender

    found.webhooks = WebhookSender.from_settings(settings)
    if found.webhooks is not None:
        closers.append(found.webhooks.aclose)
        log.info("webhooks_to", url=settings.webhook_url)
    if publisher is not None:
        found.publisher = publisher
    elif settings.mqtt_url:
        from listener.adapters.mqtt import MqttPublisher

        try:
            found.publisher = MqttPublisher(settings.mqtt_url, identifier)
        except ValueError as exc:
            raise ConfigError(f"MQTT_URL: {exc}") from None
        await found.publisher.start()
        closers.append(found.publisher.close)
    try:
        yield found
    finally:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()


@dataclass
class Listener:
    """A running listener's parts."""

    settings: Settings
    ruleset: RuleSet  # as active in this database
    queries: dict[str, TableQuery]
    backend: Backend
    daemon: Any
    inactive: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def assemble(settings: Settings, ruleset: RuleSet, *, clock: Clock | None = None,
                   on_result: Callable[[Any], None] | None = None,
                   readiness: Any = None, backend: Backend | None = None,
                   sender: Any = None, publisher: Any = None, holder: str | None = None,
                   email_rate: float | None = None, mailer_options: dict[str, Any] | None = None,
                   shutdown_grace_s: float | None = None) -> AsyncIterator[Listener]:
    """Everything `listener run` runs, built and opened; closed on the way out.
    Tests pass a backend, sender or publisher of their own."""
    from listener.clock import WallClock
    from listener.daemon import Daemon, DaemonConfig
    from listener.ops import Readiness

    queries = table_queries(ruleset, settings.max_notify_lateness)
    own_backend = backend is None
    backend = backend or await open_backend(settings, queries, recipients_of(ruleset))
    try:
        found = await activation_of(backend, ruleset)
        for rule, why in found.inactive.items():
            log.warning("rule_inactive", rule=rule, why=why)
        for table in found.missing_tables:
            log.info("table_missing", table=table, why="its rules are inactive here")
        active = table_queries(found.ruleset, settings.max_notify_lateness, found.available)
        backend.use(active)
        config = DaemonConfig(lease_ttl=settings.lease_ttl,
                              reconcile_interval=settings.reconcile_interval,
                              max_notify_lateness=settings.max_notify_lateness,
                              holder=holder or settings.instance_name or "")
        if shutdown_grace_s is not None:
            config.shutdown_grace_s = shutdown_grace_s
        async with effects(settings, found.ruleset, backend.store, config.holder,
                           sender=sender, publisher=publisher, rate_per_second=email_rate,
                           mailer_options=mailer_options) as fx:
            daemon = Daemon(found.ruleset, active, backend.store, backend.source,
                            clock or WallClock(), config, deliverer=fx.deliverer,
                            publisher=fx.publisher, webhooks=fx.webhooks,
                            readiness=readiness or Readiness(), on_result=on_result)
            yield Listener(settings, found.ruleset, active, backend, daemon, found.inactive)
    finally:
        if own_backend:
            await backend.close()


def report_page(listener: Listener) -> Callable[[], Any] | None:
    """What /report serves (when OPS_TOKEN is set): the last 7 days, with what
    this instance has armed for the next 24 hours."""
    from listener.clock import WallClock
    from listener.instants import DAY, format_instant
    from listener.report.sources import ops_page, rpc_source, sql_source

    backend = listener.backend
    if backend.name == "supabase":
        client = getattr(backend.store, "client", None)
        if client is None:
            return None
        source = rpc_source(client)
    elif backend.conninfo:
        source = sql_source(backend.conninfo)
    else:
        return None

    def upcoming(until: int) -> list[dict[str, Any]]:
        engine = listener.daemon.engine
        if engine is None:
            return []
        return [{"at": format_instant(due), "rule": rule.name, "table": table, "row_id": key}
                for due, rule, table, key in engine.upcoming() if due <= until + DAY]

    return ops_page(source, WallClock().now, upcoming=upcoming)


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


async def serve(settings: Settings, ruleset: RuleSet, *, stop: asyncio.Event | None = None,
                on_result: Any = None, signals: bool = True) -> None:
    """`listener run`: the daemon on the configured backend until stopped."""
    from listener.ops import OpsServer, Readiness

    stop = stop or asyncio.Event()
    if signals:
        install_signal_handlers(stop)
    readiness = Readiness()
    ops = None
    try:
        async with assemble(settings, ruleset, on_result=on_result,
                            readiness=readiness) as listener:
            ops = OpsServer.from_settings(settings, readiness,
                                          report=report_page(listener))
            if ops is not None:
                port = await ops.start()
                log.info("ops_listening", host=settings.ops_host, port=port)
            log.info("listener_started", backend=listener.backend.name,
                     holder=listener.daemon.config.holder, rules=len(listener.ruleset),
                     tables=list(listener.queries), time_scale=ruleset.time_scale)
            await listener.daemon.run(stop)
    finally:
        if ops is not None:
            await ops.stop()
        log.info("listener_stopped")


@dataclass(frozen=True)
class Upcoming:
    due: int
    rule: str
    table: str
    key: str
    status: str | None


async def upcoming_actions(settings: Settings, ruleset: RuleSet,
                           limit: int | None = None) -> tuple[int, list[Upcoming]]:
    """What is due next in the configured database, soonest first (`plan`, `report`)."""
    from listener.clock import WallClock
    from listener.engine import Engine
    from listener.rows import BadRow

    now = WallClock().now()
    queries = table_queries(ruleset, settings.max_notify_lateness)
    backend = await open_backend(settings, queries, recipients_of(ruleset))
    try:
        found = await activation_of(backend, ruleset)
        active = table_queries(found.ruleset, settings.max_notify_lateness, found.available)
        backend.use(active)
        engine = Engine(found.ruleset, settings.max_notify_lateness)
        statuses: dict[tuple[str, str], str | None] = {}
        for table in sorted(active, key=lambda t: active[t].parent is None):
            async for page in backend.store.tracked_pages(table):
                for row in page:
                    try:
                        applied = engine.upsert(table, row, now)
                    except BadRow:
                        continue
                    if active[table].status:
                        statuses[(table, applied.key)] = row.get(active[table].status)
    finally:
        await backend.close()
    items = [Upcoming(due, rule.name, table, key, statuses.get((table, key)))
             for due, rule, table, key in engine.upcoming()]
    return now, items[:limit] if limit is not None else items


def audit_source(settings: Settings, timeout: int) -> Any:
    """Where `listener audit` reads: SQL over DATABASE_URL (or the embedded
    database), else Supabase RPC. `timeout` is the statement timeout (µs)."""
    from listener.adapters.audit_source import RpcAuditSource, SqlAuditSource

    if settings.database_url:
        return SqlAuditSource(settings.database_url, timeout // 1000)
    if settings.backend == "supabase":
        assert settings.supabase_url and settings.supabase_service_role_key is not None
        return RpcAuditSource(settings.supabase_url,
                              settings.supabase_service_role_key.get_secret_value(),
                              timeout / 1_000_000 + 10)
    return SqlAuditSource(embedded_conninfo(settings.listener_data_dir), timeout // 1000)


def audit_findings(settings: Settings, ruleset: RuleSet) -> list[dict[str, Any]]:
    """The audit's findings, as the report shows them; empty when it cannot run."""
    from datetime import timedelta

    from listener.adapters.audit_source import AuditUnavailable
    from listener.audit import Auditor

    try:
        source = audit_source(settings, 30_000_000)
    except AuditUnavailable:
        return []
    try:
        grace = timedelta(microseconds=settings.reconcile_interval + 60_000_000)
        report = Auditor(source, ruleset, grace=grace,
                         max_notify_lateness=settings.max_notify_lateness).run(None)
    except AuditUnavailable:
        return []
    finally:
        source.close()
    return list(report.as_json().get("findings", []))
