"""The ops endpoint (/healthz, /readyz, /metrics) over real HTTP, and the
deployment files (render.yaml, Dockerfile) checked by parsing them."""
from __future__ import annotations

import asyncio
import re
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from listener.metrics import FIRING_LATENESS, TIMERS_ARMED, action_counter
from listener.ops import OpsServer, Readiness
from listener.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(client: aiohttp.ClientSession, port: int, path: str,
              **kw: Any) -> tuple[int, Any, Any]:
    async with client.get(f"http://127.0.0.1:{port}{path}", **kw) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json(), resp.headers
        return resp.status, await resp.text(), resp.headers


# -- /healthz -----------------------------------------------------------------


async def test_healthz_ok_and_binds_loopback(client: aiohttp.ClientSession) -> None:
    async with OpsServer(Readiness()) as server:
        assert server.host == "127.0.0.1"
        assert server.port and server.port > 0
        status, body, _ = await get(client, server.port, "/healthz")
        assert status == 200
        assert body["status"] == "ok"
        async with client.head(f"http://127.0.0.1:{server.port}/healthz") as resp:
            assert resp.status == 200
        status, _, _ = await get(client, server.port, "/nope")
        assert status == 404


async def test_healthz_fails_when_the_heartbeat_is_stale(client: aiohttp.ClientSession) -> None:
    readiness = Readiness()
    # A heartbeat that will not tick again during the test: only the stale stamp counts.
    async with OpsServer(readiness, heartbeat_interval=3600, stale_after=5.0) as server:
        readiness.last_loop_tick = time.monotonic() - 60
        status, body, _ = await get(client, server.port, "/healthz")
        assert status == 503
        assert body["status"] == "stalled"
        assert body["loop_lag_s"] >= 60
        readiness.tick()
        status, body, _ = await get(client, server.port, "/healthz")
        assert status == 200


async def test_heartbeat_ticks_on_the_loop(client: aiohttp.ClientSession) -> None:
    readiness = Readiness()
    async with OpsServer(readiness, heartbeat_interval=0.05, stale_after=0.5) as server:
        readiness.last_loop_tick = time.monotonic() - 60
        await asyncio.sleep(0.2)
        assert readiness.loop_age() < 0.5
        status, _, _ = await get(client, server.port, "/healthz")
        assert status == 200


async def test_healthz_fails_when_the_heartbeat_task_died(client: aiohttp.ClientSession) -> None:
    readiness = Readiness()
    async with OpsServer(readiness) as server:
        assert server._heartbeat is not None
        server._heartbeat.cancel()
        await asyncio.sleep(0)
        status, body, _ = await get(client, server.port, "/healthz")
        assert status == 503
        assert body["heartbeat"] is False


async def test_blocked_loop_answers_no_probe() -> None:
    """While the loop is blocked nothing on it runs, the probe included: a
    prober's timeout is what reports a loop blocked right now, the stale
    heartbeat one that was starved for longer than stale_after."""
    async with OpsServer(Readiness()) as server:
        outcome: dict[str, object] = {}

        def probe() -> None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz",
                                            timeout=0.3) as resp:
                    outcome["status"] = resp.status
            except (TimeoutError, urllib.error.URLError) as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=probe)
        thread.start()
        time.sleep(0.8)  # block the event loop
        thread.join(timeout=2)
        assert "status" not in outcome and "error" in outcome
        # Once unblocked, the loop serves again (and settles the abandoned probe).
        async with aiohttp.ClientSession() as session:
            status, _, _ = await get(session, server.port, "/healthz")
        assert status == 200
        await asyncio.sleep(0.1)


# -- /readyz ------------------------------------------------------------------


async def test_readyz_transitions(client: aiohttp.ClientSession) -> None:
    readiness = Readiness()
    async with OpsServer(readiness) as server:
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 503
        assert body["role"] == "starting"
        assert body["checks"] == {"source_subscribed": False, "database_reachable": False,
                                  "lease": False}

        readiness.source_subscribed = True
        readiness.database_reachable = True
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 503  # still starting: neither holding the lease nor standing by
        assert body["checks"]["lease"] is False

        readiness.role = "active"
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 200
        assert body == {"status": "ready", "role": "active",
                        "checks": {"source_subscribed": True, "database_reachable": True,
                                   "lease": True}}

        readiness.role = "standby"
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 200
        assert body["role"] == "standby"

        readiness.database_reachable = False
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 503
        assert body["checks"]["database_reachable"] is False
        assert body["checks"]["source_subscribed"] is True

        readiness.database_reachable = True
        readiness.source_subscribed = False
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 503

        readiness.source_subscribed = True
        readiness.role = "stopping"
        status, body, _ = await get(client, server.port, "/readyz")
        assert status == 503
        assert body["role"] == "stopping"


def test_readiness_rejects_unknown_roles() -> None:
    readiness = Readiness()
    with pytest.raises(ValueError, match="role"):
        readiness.role = "leader"
    with pytest.raises(ValueError):
        Readiness(role="")
    assert readiness.role == "starting"


# -- /metrics -----------------------------------------------------------------


async def test_metrics_prometheus_text(client: aiohttp.ClientSession) -> None:
    TIMERS_ARMED.set(7)
    action_counter("ops_test_rule", "fired").inc()
    FIRING_LATENESS.observe(0.003)
    async with OpsServer(Readiness()) as server:
        status, body, headers = await get(client, server.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert isinstance(body, str)
    assert re.search(r"^listener_timers_armed 7\.0$", body, re.M)
    assert re.search(
        r'^listener_actions_total\{outcome="fired",rule="ops_test_rule"\} [1-9]', body, re.M)
    assert re.search(r'^listener_firing_lateness_seconds_bucket\{le="0\.005"\} [1-9]', body, re.M)
    for name in ("listener_sessions_tracked", "listener_reconcile_drift_total",
                 "listener_source_reconnects_total", "listener_email_attempts_total",
                 "listener_email_failures_total", "listener_mqtt_buffer_depth"):
        assert f"# TYPE {name.removesuffix('_total')}" in body or f"# TYPE {name}" in body


async def test_metrics_openmetrics_on_request(client: aiohttp.ClientSession) -> None:
    async with OpsServer(Readiness()) as server:
        status, body, headers = await get(
            client, server.port, "/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


# -- settings and lifecycle ---------------------------------------------------


async def test_from_settings_off_by_default_and_loopback(client: aiohttp.ClientSession) -> None:
    readiness = Readiness()
    assert OpsServer.from_settings(Settings(ops_port=None), readiness) is None
    server = OpsServer.from_settings(Settings(ops_port=0), readiness)
    assert server is not None and server.host == "127.0.0.1"
    port = await server.start()
    try:
        status, _, _ = await get(client, port, "/healthz")
        assert status == 200
    finally:
        await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(client, port, "/healthz")


# -- render.yaml --------------------------------------------------------------


class _Lines:
    def __init__(self, text: str) -> None:
        self.items: list[tuple[int, str, int]] = []
        for number, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw:
                raise ValueError(f"line {number}: tab")
            line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
            if line.strip():
                self.items.append((len(line) - len(line.lstrip(" ")), line.strip(), number))


def parse_yaml_subset(text: str) -> Any:
    """Block-style YAML as render.yaml uses it: mappings, sequences, plain or
    quoted scalars. Anything else (flow collections, anchors, multi-line
    strings, odd indentation, duplicate keys) is an error, not a guess."""
    lines = _Lines(text).items

    def scalar(raw: str, number: int) -> Any:
        if raw[:1] in "[{&*|>!%@`":
            raise ValueError(f"line {number}: unsupported YAML {raw!r}")
        if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            return raw[1:-1]
        if raw in ("true", "false"):
            return raw == "true"
        if raw in ("null", "~"):
            return None
        if re.fullmatch(r"-?[0-9]+", raw):
            return int(raw)
        if ": " in raw or raw.endswith(":"):
            raise ValueError(f"line {number}: ambiguous scalar {raw!r}")
        return raw

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- ") or lines[i][1] == "-":
            out: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1][:1] == "-":
                _, content, number = lines[i]
                rest = content[1:].lstrip(" ")
                if not rest:
                    value, i = block(i + 1, indent_after(i, indent))
                elif re.match(r"^[A-Za-z_][\w.-]*:( |$)", rest):
                    lines[i] = (indent + len(content) - len(rest), rest, number)
                    value, i = block(i, lines[i][0])
                else:
                    value, i = scalar(rest, number), i + 1
                out.append(value)
            check_dedent(i, indent)
            return out, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and lines[i][1][:1] != "-":
            _, content, number = lines[i]
            match = re.fullmatch(r"([A-Za-z_][\w.-]*):(?: +(.*))?", content)
            if not match:
                raise ValueError(f"line {number}: expected 'key: value', got {content!r}")
            key, raw = match.group(1), match.group(2)
            if key in mapping:
                raise ValueError(f"line {number}: duplicate key {key!r}")
            if raw is None:
                nested = i + 1 < len(lines) and (
                    lines[i + 1][0] > indent
                    or (lines[i + 1][0] == indent and lines[i + 1][1][:1] == "-"))
                if not nested:
                    mapping[key], i = None, i + 1
                    continue
                mapping[key], i = block(i + 1, lines[i + 1][0])
            else:
                mapping[key], i = scalar(raw, number), i + 1
        check_dedent(i, indent)
        return mapping, i

    def indent_after(i: int, indent: int) -> int:
        if i + 1 >= len(lines) or lines[i + 1][0] <= indent:
            raise ValueError(f"line {lines[i][2]}: empty sequence item")
        return lines[i + 1][0]

    def check_dedent(i: int, indent: int) -> None:
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"line {lines[i][2]}: unexpected indentation")

    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"line {lines[end][2]}: unexpected indentation")
    return value


def test_yaml_subset_parser_is_strict() -> None:
    assert parse_yaml_subset("a:\n  - b: 1\n    c: 'x'\n  - d\ne: false\n") == {
        "a": [{"b": 1, "c": "x"}, "d"], "e": False}
    for bad in ("a: [1, 2]\n", "a: 1\na: 2\n", "a:\n  b: 1\n   c: 2\n", "a: |\n  x\n",
                "a: b: c\n"):
        with pytest.raises(ValueError):
            parse_yaml_subset(bad)


def load_render_yaml() -> dict[str, Any]:
    text = (ROOT / "render.yaml").read_text()
    blueprint = parse_yaml_subset(text)
    try:
        import yaml  # not a dependency; when present it must agree
    except ImportError:
        pass
    else:
        assert yaml.safe_load(text) == blueprint
    return blueprint


SECRETS = ("SUPABASE_SERVICE_ROLE_KEY", "RESEND_API_KEY", "MQTT_URL")
FROM_WEB = ("NEXT_PUBLIC_SUPABASE_URL", "NEXT_PUBLIC_APP_URL")
SOURCES = ("value", "fromService", "fromDatabase", "fromGroup", "generateValue", "sync")


def test_render_blueprint_worker() -> None:
    blueprint = load_render_yaml()
    assert set(blueprint) == {"services"}
    (service,) = blueprint["services"]
    assert service["type"] == "worker"
    assert service["name"] == "session-listener"
    assert service["runtime"] == "docker"
    assert service["plan"] == "starter"
    assert service["dockerfilePath"] == "./Dockerfile"
    assert (ROOT / service.get("dockerContext", ".") / service["dockerfilePath"]).is_file()
    assert "startCommand" not in service and "schedule" not in service

    env = {}
    for var in service["envVars"]:
        assert var["key"] not in env, f"{var['key']} twice"
        assert sum(source in var for source in SOURCES) == 1, var
        env[var["key"]] = var

    for key in FROM_WEB:
        assert env[key]["fromService"] == {"type": "web", "name": "theautodoctor-web",
                                           "envVarKey": key}
    for key in SECRETS + ("EMAIL_FROM", "SUPPORT_EMAIL"):
        assert env[key] == {"key": key, "sync": False}
    # Anything that looks like a credential is never written in the file.
    for key, var in env.items():
        if re.search(r"KEY|SECRET|TOKEN|PASSWORD|_URL$", key):
            assert "value" not in var and "generateValue" not in var, key
    assert env["LOG_LEVEL"]["value"] == "info"
    assert env["RECONCILE_INTERVAL"]["value"] == "60s"


def test_render_blueprint_configures_the_supabase_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the Blueprint provides are the ones Settings reads."""
    (service,) = load_render_yaml()["services"]
    for name in ("SUPABASE_URL", "DATABASE_URL", "OPS_PORT", "LOG_LEVEL", "RECONCILE_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    for var in service["envVars"]:
        if "value" in var:
            monkeypatch.setenv(var["key"], str(var["value"]))
        elif var["key"] == "NEXT_PUBLIC_SUPABASE_URL":
            monkeypatch.setenv(var["key"], "https://project.supabase.co")
        else:  # what the Dashboard or the web service fills in
            monkeypatch.setenv(var["key"], f"stand-in-{var['key'].lower()}")
    settings = Settings()
    assert settings.backend == "supabase"
    assert settings.supabase_url == "https://project.supabase.co"
    assert settings.reconcile_interval == 60 * 1_000_000
    assert settings.log_level == "info"
    assert settings.ops_port is None


# -- Dockerfile (no Docker engine here: checked by reading it) ------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) == 2, "builder + final stage"
    bases = {rest.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for rest in froms}
    (base,) = bases  # both stages on the same base
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)

    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    final_words = [w for w, _ in final]
    copies = [rest for w, rest in final if w == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]  # nothing else reaches the image
    assert "RUN" not in [w for w, rest in final if "apt-get" in rest or "pip " in rest]
    user = [rest for w, rest in final if w == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert final_words.index("USER") > final_words.index("COPY")
    assert ("WORKDIR", "/app") in final
    assert any(w == "ENV" and "PYTHONUNBUFFERED=1" in rest for w, rest in final)
    assert ("STOPSIGNAL", "SIGTERM") in final
    # Exec form: the listener itself is PID 1 and receives SIGTERM.
    assert ("ENTRYPOINT", '["listener"]') in final
    assert ("CMD", '["run"]') in final

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "listener" in project["project"]["scripts"]
    builder = instructions[:len(instructions) - len(final)]
    copied = {source.removeprefix("./").rstrip("/")
              for word, rest in builder if word == "COPY"
              for source in rest.split()[:-1] if not source.startswith("--")}
    for package in project["tool"]["setuptools"]["packages"]:
        assert package.split(".")[0] in copied, f"{package} not copied into the build"
    assert project["project"]["readme"] in copied and "pyproject.toml" in copied
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & copied, "the build copies something .dockerignore leaves out"
