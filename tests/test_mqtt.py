"""MqttPublisher against a real Mosquitto (the system one on 127.0.0.1:1883, and a
private one on a free port for the broker-restart test)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest

from listener.adapters.mqtt import MqttPublisher, parse_mqtt_url
from listener.effects import ActionEvent
from listener.metrics import REGISTRY

HOST = "127.0.0.1"
SYSTEM_PORT = 1883
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def port_open(port: int, host: str = HOST) -> bool:
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, up: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while port_open(port) != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} not {'up' if up else 'down'} after {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def system_broker():
    if not port_open(SYSTEM_PORT):
        if not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed")
        subprocess.run([MOSQUITTO, "-d", "-c", "/etc/mosquitto/mosquitto.conf"], check=True)
        wait_port(SYSTEM_PORT, up=True)


@pytest.fixture
def prefix():
    """A unique topic prefix; its retained status is cleared afterwards."""
    p = f"test-{uuid.uuid4().hex[:10]}"
    yield p

    async def clear() -> None:
        async with aiomqtt.Client(HOST, SYSTEM_PORT) as c:
            await c.publish(f"{p}/listener/status", b"", qos=1, retain=True)

    with contextlib.suppress(Exception):
        asyncio.run(clear())


def event(i: int, rule: str = "mechanic_nudge", **kw) -> ActionEvent:
    return ActionEvent(rule=rule, table="sessions", row_id=f"00000000-0000-0000-0000-{i:012d}",
                       due_at="2026-03-02T10:03:00Z", fired_at="2026-03-02T10:03:00.004Z",
                       lateness_ms=4, outcome="fired", **kw)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


class Collector:
    """Subscribes and records every message; reconnects (same session) if the broker goes."""

    def __init__(self, port: int, topic: str, *, identifier: str | None = None,
                 clean_session: bool | None = None) -> None:
        self.port, self.topic = port, topic
        self.identifier, self.clean_session = identifier, clean_session
        self.messages: list[aiomqtt.Message] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self.subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(HOST, self.port, identifier=self.identifier,
                                          clean_session=self.clean_session) as c:
                    await c.subscribe(self.topic, qos=1)
                    self.subscribed.set()
                    async for m in c.messages:
                        self.messages.append(m)
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.1)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[aiomqtt.Message]:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"got {len(self.messages)} of {count} messages")
            await asyncio.sleep(0.02)
        return self.messages


async def retained(port: int, topic: str, timeout: float = 2.0) -> bytes | None:
    """The retained payload on `topic`, as a new subscriber sees it (None if none)."""
    async with aiomqtt.Client(HOST, port) as c:
        await c.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for m in c.messages:
                    if m.retain:
                        return bytes(m.payload)
        except TimeoutError:
            return None
    return None


async def wait_retained(port: int, topic: str, expected: bytes, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await retained(port, topic, timeout=0.5)
        if last == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"retained {topic} is {last!r}, expected {expected!r}")


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def publisher(port: int, prefix: str, **kw) -> MqttPublisher:
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.5)
    return MqttPublisher(f"mqtt://{HOST}:{port}/{prefix}", identifier=f"listener-{prefix}", **kw)


# -- tests -------------------------------------------------------------------------------


def test_parse_mqtt_url_defaults_and_secrets():
    t = parse_mqtt_url("mqtt://user:p%40ss@broker.example")
    assert (t.host, t.port, t.username, t.password, t.prefix, t.tls) == (
        "broker.example", 1883, "user", "p@ss", "autodoctor", False)
    t = parse_mqtt_url("mqtts://u:secret@h:8884/ad/prod/")
    assert (t.port, t.prefix, t.tls) == (8884, "ad/prod", True)
    assert parse_mqtt_url("mqtts://h").port == 8883
    assert "secret" not in repr(t) and "secret" not in repr(
        MqttPublisher("mqtt://u:secret@h/x", identifier="i"))
    with pytest.raises(ValueError):
        parse_mqtt_url("http://h")


async def test_every_event_arrives_on_its_topic_with_qos1(prefix):
    events = [event(i, rule=("mechanic_nudge", "request_expiry")[i % 2],
                    **({"status": "expired", "reason": "no_mechanic_available"} if i % 2 else {}))
              for i in range(50)]
    async with Collector(SYSTEM_PORT, f"{prefix}/sessions/#") as sub:
        pub = publisher(SYSTEM_PORT, prefix)
        await pub.start()
        for e in events:
            pub.publish(e)
        msgs = await sub.wait_for(len(events))
        await pub.close()

    assert [str(m.topic) for m in msgs] == [
        f"{prefix}/sessions/{e.session_id}/{e.rule}" for e in events]
    assert [json.loads(m.payload) for m in msgs] == [e.as_dict() for e in events]
    assert all(m.qos == 1 for m in msgs)
    assert pub.published == 50 and pub.buffered == 0


async def test_status_is_online_while_running_and_offline_after_close(prefix):
    status = f"{prefix}/listener/status"
    pub = publisher(SYSTEM_PORT, prefix)
    await pub.start()
    await wait_retained(SYSTEM_PORT, status, b"online")
    pub.publish(event(1))
    await pub.close()
    assert pub.buffered == 0
    assert await retained(SYSTEM_PORT, status) == b"offline"


async def test_last_will_marks_offline_when_the_process_is_killed(prefix):
    status = f"{prefix}/listener/status"
    code = textwrap.dedent(f"""
        import asyncio, sys
        from listener.adapters.mqtt import MqttPublisher
        async def main():
            pub = MqttPublisher("mqtt://{HOST}:{SYSTEM_PORT}/{prefix}", identifier="kill-{prefix}")
            await pub.start()
            while not pub.connected:
                await asyncio.sleep(0.02)
            print("ready", flush=True)
            await asyncio.sleep(3600)
        asyncio.run(main())
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(15):  # structlog also writes to stdout
            while (line := await proc.stdout.readline()) and line.strip() != b"ready":
                pass
            assert line.strip() == b"ready"
        await wait_retained(SYSTEM_PORT, status, b"online")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await wait_retained(SYSTEM_PORT, status, b"offline")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_buffer_overflow_drops_oldest_and_counts(prefix):
    dropped = metric("listener_mqtt_dropped_total")
    pub = publisher(SYSTEM_PORT, prefix, buffer_size=5)
    for i in range(8):  # not started yet: as if the broker were away
        pub.publish(event(i))
    assert pub.buffered == 5 and pub.dropped == 3
    assert metric("listener_mqtt_dropped_total") == dropped + 3
    assert metric("listener_mqtt_buffer_depth") == 5

    async with Collector(SYSTEM_PORT, f"{prefix}/sessions/#") as sub:
        await pub.start()
        msgs = await sub.wait_for(5)
        await pub.close()
    assert [json.loads(m.payload)["session_id"] for m in msgs] == [
        event(i).session_id for i in range(3, 8)]
    assert metric("listener_mqtt_buffer_depth") == 0


async def test_unreachable_broker_never_blocks_or_raises(prefix):
    pub = publisher(free_port(), prefix)  # nothing listens there
    await pub.start()
    for i in range(10):
        pub.publish(event(i))
    await asyncio.sleep(0.3)
    assert not pub.connected and pub.buffered == 10
    t0 = time.monotonic()
    await pub.close(timeout=1.0)
    assert time.monotonic() - t0 < 3.0


@pytest.fixture
def private_broker(tmp_path: Path):
    """A Mosquitto of our own on a free port, with persistence, that a test can restart."""
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    lines = [f"listener {port} {HOST}", "allow_anonymous true", "persistence true",
             f"persistence_location {tmp_path}/", f"log_dest file {tmp_path}/mosquitto.log"]
    if os.geteuid() == 0:
        lines.append("user root")  # else it drops to `mosquitto`, who cannot write tmp_path
    conf.write_text("\n".join(lines) + "\n")

    class Broker:
        proc: subprocess.Popen | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(port, up=True)

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # saves the persistence file
                self.proc.wait(timeout=10)
            wait_port(port, up=False)

    broker = Broker()
    broker.port = port
    broker.start()
    yield broker
    broker.stop()


async def test_broker_restart_loses_no_buffered_event(private_broker, prefix):
    port = private_broker.port
    # A persistent subscriber session, so the broker keeps queueing for it across the restart.
    async with Collector(port, f"{prefix}/sessions/#", identifier=f"sub-{prefix}",
                         clean_session=False) as sub:
        pub = publisher(port, prefix)
        await pub.start()
        before = [event(i) for i in range(5)]
        for e in before:
            pub.publish(e)
        await sub.wait_for(5)

        await asyncio.to_thread(private_broker.stop)
        await wait_until(lambda: not pub.connected)
        during = [event(i) for i in range(5, 30)]
        for e in during:
            pub.publish(e)
        await asyncio.sleep(0.3)
        assert pub.buffered == len(during)  # nothing lost, nothing sent yet

        await asyncio.to_thread(private_broker.start)
        await wait_until(lambda: pub.buffered == 0)
        await sub.wait_for(30)
        await pub.close()

    ids = [json.loads(m.payload)["session_id"] for m in sub.messages]
    expected = [e.session_id for e in before + during]
    assert set(ids) == set(expected)
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == expected  # in order
