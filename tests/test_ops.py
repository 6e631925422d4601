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
import yaml
from pydantic import AliasChoices

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


def load_render_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "render.yaml").read_text())


def render_worker() -> dict[str, Any]:
    blueprint = load_render_yaml()
    (service,) = blueprint["services"]
    return service


def declared_env(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    env: dict[str, dict[str, Any]] = {}
    for var in service.get("envVars", []):
        assert var["key"] not in env, f"{var['key']} declared twice"
        assert sum(source in var for source in SOURCES) == 1, var
        env[var["key"]] = var
    return env


def env_names(name: str, field: Any) -> list[str]:
    """The variables Settings reads a field from (aliases, else the field's name)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    return [str(alias)] if isinstance(alias, str) else [name.upper()]


SOURCES = ("value", "fromService", "fromDatabase", "fromGroup", "generateValue", "sync")
# Settings without a production value of their own, and why Render need not set them.
NOT_FOR_PRODUCTION = {
    "database_url": "the worker reaches Supabase through its API",
    "resend_api_url": "tests point the Resend SDK at a local server",
    "email_outbox": "emails as files: development only",
    "ops_port": "the ops endpoint stays off on a worker",
    "instance_name": "the host name is default enough",
}
# Settings whose default is a development value: production must set them.
DEVELOPMENT_DEFAULTS = {"next_public_app_url"}
# What a credential looks like when someone pastes one inline.
CREDENTIAL = re.compile(r"^(re_|sk_|eyJ|sb_secret_)|://[^/\s:@]+:[^/\s@]+@")


def test_render_blueprint_worker() -> None:
    service = render_worker()
    assert service["type"] == "worker" and service["runtime"] == "docker"
    dockerfile = ROOT / service.get("dockerContext", ".") / service["dockerfilePath"]
    assert dockerfile.resolve() == (ROOT / "Dockerfile").resolve() and dockerfile.is_file()
    assert "startCommand" not in service and "schedule" not in service  # a worker, not a cron


def test_render_blueprint_holds_no_secret_values() -> None:
    env = declared_env(render_worker())
    secrets = {env_name for name, field in Settings.model_fields.items()
               if "SecretStr" in str(field.annotation) for env_name in env_names(name, field)}
    assert {"SUPABASE_SERVICE_ROLE_KEY", "RESEND_API_KEY"} <= secrets
    for key, var in env.items():
        if key in secrets or re.search(r"KEY|SECRET|TOKEN|PASSWORD", key):
            assert var.get("sync") is False or var.get("generateValue") is True, var
        if key.endswith("_URL") and "fromService" not in var:
            assert var.get("sync") is False, var  # URLs may carry credentials (MQTT, database)
        if "value" in var:
            assert not CREDENTIAL.search(str(var["value"])), key


def test_render_blueprint_declares_every_setting_production_needs() -> None:
    env = declared_env(render_worker())
    for name, field in Settings.model_fields.items():
        if name in NOT_FOR_PRODUCTION:
            continue
        if field.is_required() or field.default is None or name in DEVELOPMENT_DEFAULTS:
            names = env_names(name, field)
            assert set(names) & set(env), f"render.yaml sets none of {names} ({name})"
    for key in ("NEXT_PUBLIC_SUPABASE_URL", "NEXT_PUBLIC_APP_URL"):  # the web app's own values
        assert env[key]["fromService"]["envVarKey"] == key


def test_render_blueprint_configures_the_supabase_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the Blueprint provides are the ones Settings reads."""
    service = render_worker()
    for name in ("SUPABASE_URL", "DATABASE_URL", "OPS_PORT", "LOG_LEVEL", "RECONCILE_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    for var in service["envVars"]:
        if "value" in var:
            monkeypatch.setenv(var["key"], str(var["value"]))
        elif var["key"] == "NEXT_PUBLIC_SUPABASE_URL":
            monkeypatch.setenv(var["key"], "https://project.supabase.co")
        elif var["key"] == "WEBHOOK_URL":
            monkeypatch.setenv(var["key"], "https://app.example/api/listener/webhook")
        elif var.get("generateValue"):  # Render makes a random value
            monkeypatch.setenv(var["key"], "g" * 32)
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
