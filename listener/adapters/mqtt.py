"""EventPublisher on MQTT (aiomqtt 2.x, QoS 1), with a bounded buffer.

- `publish(event)` only appends to a bounded deque (oldest dropped when full,
  counted in MQTT_DROPPED); it never blocks on, or raises because of, the broker.
- A background task (`start()`) connects with a retained last will
  `<prefix>/listener/status` = `offline`, publishes a retained `online`, and
  drains the buffer in order: each event is JSON on
  `<prefix>/<table>/<row_id>/<rule>` with QoS 1 and leaves the buffer only
  once the broker acknowledged it (PUBACK). An event in flight when the
  connection drops is published again after reconnecting (at least once).
- aiomqtt does not reconnect: on any connection error the task waits a capped,
  jittered exponential backoff and connects again with a fresh client (a fresh
  paho state, so nothing stale is re-sent behind our back).
- `close()` flushes what it can within a timeout, publishes a retained
  `offline`, and disconnects cleanly (so the broker does not fire the will).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog

from listener.effects import ActionEvent
from listener.metrics import MQTT_BUFFER, MQTT_DROPPED
from listener.retry import Backoff

log = structlog.get_logger("listener.mqtt")

DEFAULT_PREFIX = "autodoctor"


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    prefix: str
    tls: bool

    def __repr__(self) -> str:  # never show the password
        user = f"{self.username}:***@" if self.username else ""
        return f"MqttTarget({'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}/{self.prefix})"


def parse_mqtt_url(url: str) -> MqttTarget:
    """`mqtt://user:pass@host:1883/prefix` (`mqtts://` for TLS, default port 1883/8883,
    default prefix `autodoctor`). Raises ValueError with a message free of the password."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme in ("mqtt", "tcp"):
        tls = False
    elif scheme in ("mqtts", "ssl", "tls"):
        tls = True
    else:
        raise ValueError(f"MQTT_URL: unsupported scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
    if not parts.hostname:
        raise ValueError("MQTT_URL: missing host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError("MQTT_URL: invalid port") from None
    prefix = parts.path.strip("/") or DEFAULT_PREFIX
    if any(c in prefix for c in "+#\0"):
        raise ValueError("MQTT_URL: the topic prefix may not contain + or #")
    return MqttTarget(
        host=parts.hostname, port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        prefix=prefix, tls=tls)


def _level(value: str) -> str:
    """A value made safe as one topic level (no separators or wildcards)."""
    return "".join("_" if c in "/+#\0" else c for c in str(value)) or "_"


class MqttPublisher:
    """Implements `EventPublisher`."""

    def __init__(self, url: str, identifier: str, buffer_size: int = 10000, *,
                 reconnect_min: float = 0.5, reconnect_max: float = 30.0,
                 keepalive: int = 30, timeout: float = 10.0) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.target = parse_mqtt_url(url)
        self.identifier = identifier
        self.prefix = self.target.prefix
        self.status_topic = f"{self.prefix}/listener/status"
        self.buffer_size = buffer_size
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.keepalive = keepalive
        self.timeout = timeout
        self._buffer: collections.deque[ActionEvent] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._ssl: ssl.SSLContext | None = None
        self._flush_deadline: float | None = None  # loop time; set by close()
        self.published = 0  # events acknowledged by the broker
        self.dropped = 0

    def __repr__(self) -> str:
        return f"MqttPublisher({self.target!r}, identifier={self.identifier!r})"

    # -- EventPublisher -----------------------------------------------------------------

    def topic_for(self, event: ActionEvent) -> str:
        return (f"{self.prefix}/{_level(event.table)}/{_level(event.row_id)}/"
                f"{_level(event.rule)}")

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def publish(self, event: ActionEvent) -> None:
        """Queue `event` (call from the event loop's thread). O(1), never raises."""
        try:
            if len(self._buffer) >= self.buffer_size:
                self._buffer.popleft()
                self.dropped += 1
                MQTT_DROPPED.inc()
            self._buffer.append(event)
            MQTT_BUFFER.set(len(self._buffer))
            if self._wakeup is not None:
                self._wakeup.set()
        except Exception:  # never raise into the caller
            log.exception("mqtt_publish_enqueue_failed", rule=getattr(event, "rule", None))

    async def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()
        if self._buffer:
            self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name=f"mqtt-publisher-{self.identifier}")

    async def close(self, timeout: float = 3.0) -> None:
        """Flush within `timeout`, publish retained `offline`, disconnect. Never raises."""
        task = self._task
        if task is None:
            return
        try:
            assert self._closing is not None and self._wakeup is not None
            # Stop flushing a little before the timeout, to leave time for the
            # retained `offline` and a clean disconnect.
            self._flush_deadline = asyncio.get_running_loop().time() + timeout * 0.7
            self._closing.set()
            self._wakeup.set()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                log.warning("mqtt_close_timeout", buffered=len(self._buffer), timeout_s=timeout)
                task.cancel()
                await asyncio.wait({task}, timeout=max(1.0, timeout))
            elif not task.cancelled() and task.exception() is not None:
                log.error("mqtt_publisher_crashed", error=repr(task.exception()))
        except Exception as exc:  # pragma: no cover - defensive
            log.error("mqtt_close_failed", error=repr(exc))
        finally:
            self._task = None
            self._connected = False
            MQTT_BUFFER.set(len(self._buffer))

    # -- background task ----------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        # Built once: loading the CA bundle costs tens of ms of CPU on the loop.
        if self.target.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _client(self) -> aiomqtt.Client:
        t = self.target
        return aiomqtt.Client(
            t.host, t.port, username=t.username, password=t.password,
            identifier=self.identifier, keepalive=self.keepalive, timeout=self.timeout,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
            tls_context=self._tls_context(),
        )

    async def _run(self) -> None:
        assert self._closing is not None
        backoff = Backoff(self.reconnect_min, self.reconnect_max)
        attempt = 0
        while True:
            attempt += 1
            try:
                client = self._client()
                async with client:
                    self._connected = True
                    log.info("mqtt_connected", host=self.target.host, port=self.target.port,
                             prefix=self.prefix, identifier=self.identifier, attempt=attempt,
                             buffered=len(self._buffer))
                    attempt = 0
                    backoff.reset()
                    await self._session(client)
                    self._connected = False
                log.info("mqtt_disconnected", reason="closed", buffered=len(self._buffer))
                return
            except asyncio.CancelledError:
                self._connected = False
                raise
            except Exception as exc:  # MqttError, OSError, anything: reconnect, never die
                was_connected = self._connected
                self._connected = False
                if was_connected:
                    log.warning("mqtt_disconnected", error=str(exc) or type(exc).__name__,
                                buffered=len(self._buffer))
                elif attempt == 1 or attempt % 20 == 0:
                    log.warning("mqtt_connect_failed", attempt=attempt, error=str(exc) or type(exc).__name__,
                                host=self.target.host, port=self.target.port,
                                buffered=len(self._buffer))
                else:
                    log.debug("mqtt_connect_failed", error=str(exc) or type(exc).__name__,
                              attempt=attempt)
            if self._closing.is_set():
                log.info("mqtt_gave_up_on_close", buffered=len(self._buffer))
                return
            # Waited on the closing event, so a shutdown does not sit out a backoff.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=backoff.next_delay())

    async def _session(self, client: aiomqtt.Client) -> None:
        """One connection: announce online, drain the buffer until closing."""
        assert self._wakeup is not None and self._closing is not None
        # aiomqtt exposes disconnection only through the message iterator: it
        # raises MqttError when the connection drops. We never subscribe, so it
        # yields nothing until then.
        watcher = asyncio.create_task(self._watch(client))
        try:
            await self._guarded(client.publish(self.status_topic, b"online", qos=1, retain=True),
                                watcher)
            while True:
                if self._closing.is_set() and (
                        not self._buffer or self._flush_deadline is None
                        or asyncio.get_running_loop().time() >= self._flush_deadline):
                    if self._buffer:
                        log.warning("mqtt_close_unflushed", buffered=len(self._buffer))
                    break
                if not self._buffer:
                    self._wakeup.clear()
                    waiter = asyncio.create_task(self._wakeup.wait())
                    try:
                        await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if watcher.done():
                        watcher.result()  # raises the disconnection
                    continue
                event = self._buffer[0]
                try:
                    payload = json.dumps(event.as_dict(), default=str, separators=(",", ":"))
                    topic = self.topic_for(event)
                except Exception as exc:  # an event we cannot encode: drop it, do not stall
                    log.error("mqtt_event_unencodable", error=repr(exc))
                    self._remove(event)
                    continue
                await self._guarded(client.publish(topic, payload, qos=1), watcher)
                self._remove(event)
                self.published += 1
            await self._guarded(client.publish(self.status_topic, b"offline", qos=1, retain=True),
                                watcher)
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher

    def _remove(self, event: ActionEvent) -> None:
        # The head may have been dropped by an overflow while it was in flight.
        if self._buffer and self._buffer[0] is event:
            self._buffer.popleft()
        MQTT_BUFFER.set(len(self._buffer))

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        async for _ in client.messages:
            pass
        raise aiomqtt.MqttError("disconnected")

    @staticmethod
    async def _guarded(coro, watcher: asyncio.Task[None]) -> None:  # type: ignore[no-untyped-def]
        """Await a publish, but give up as soon as the connection is known lost."""
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            task.result()
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        watcher.result()  # raises
        raise aiomqtt.MqttError("disconnected")
