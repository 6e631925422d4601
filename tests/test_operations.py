"""Operations with REAL processes: `python -m listener run` as
subprocesses on a fresh PostgreSQL database, watched through their JSON logs
(stderr), their ops endpoint (OPS_PORT) and the database itself.

Covered: graceful shutdown (SIGTERM: exit 0 within 10 s, lease released, the
next instance acquires at once; a second signal exits at once), readiness
(/readyz for a standby, an active instance and while the database is
unreachable; /healthz), /metrics after real actions, failover after `kill -9`,
fencing of a stale instance (SIGSTOP past the lease) and of stale tokens in
the SQL functions themselves, and no action run twice while its email waits
behind the rate limit (a reconcile; a takeover).

Assertions are about behaviour; waits are generous. Measured figures
(shutdown time, takeover time) are printed: run with `-s` to see them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live import MECHANIC, insert_session, query, seed_people
from tests.servers.resend_server import ResendServer

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # generous: behaviour, not timing
TIME_SCALE = "600"  # 3 min -> 0.3 s, 5 min -> 0.5 s, 15 min -> 1.5 s, 1 h -> 6 s, 3 h -> 18 s

# Variables of the developer's shell that would change what `listener run` does.
_SCRUB = ("SUPABASE_URL", "NEXT_PUBLIC_SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
          "RESEND_API_KEY", "RESEND_API_URL", "MQTT_URL", "OPS_PORT", "OPS_HOST",
          "INSTANCE_NAME", "LEASE_TTL", "RECONCILE_INTERVAL", "MAX_NOTIFY_LATENESS",
          "EMAIL_OUTBOX", "LISTENER_DATA_DIR", "LOG_LEVEL")


# -- helpers ------------------------------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float = WAIT, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, Any]:
    """(status, body): JSON decoded when it is JSON; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    except OSError as exc:
        return 0, repr(exc)
    text = raw.decode("utf-8")
    return status, json.loads(text) if ctype.startswith("application/json") else text


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Listener:
    """One `python -m listener run` process; stderr (JSON lines) goes to a file."""

    def __init__(self, name: str, database: str, workdir: Path, *, outbox: Path,
                 lease_ttl: str = "2s", ops: bool = False, **extra: str) -> None:
        self.name = name
        self.ops_port = free_port() if ops else None
        self.log_path = workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(DATABASE_URL=database, RULES_TIME_SCALE=TIME_SCALE, LEASE_TTL=lease_ttl,
                   EMAIL_OUTBOX=str(outbox), SUPPORT_EMAIL="support@example.com",
                   LOG_LEVEL="info", INSTANCE_NAME=name,
                   LISTENER_DATA_DIR=str(workdir / f"{name}-data"), PYTHONUNBUFFERED="1")
        if self.ops_port is not None:
            env["OPS_PORT"] = str(self.ops_port)
        env.update(extra)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "listener", "run"], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)

    # -- logs

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log_path.read_text("utf-8", errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                out.append(line)
        return out

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event
                and all(line.get(k) == v for k, v in fields.items())]

    def wait_for(self, event: str, count: int = 1, timeout: float = WAIT,
                 **fields: Any) -> dict[str, Any]:
        def seen() -> list[dict[str, Any]] | None:
            found = self.events(event, **fields)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"logging {event}:\n{self.tail()}")
            return None
        try:
            return wait_until(seen, timeout, what=f"{self.name}: {event} x{count}")[count - 1]
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    def tail(self, n: int = 30) -> str:
        text = self.log_path.read_text("utf-8", errors="replace").splitlines()
        return "\n".join(f"  [{self.name}] {line}" for line in text[-n:])

    # -- ops endpoint

    def get(self, path: str) -> tuple[int, Any]:
        assert self.ops_port is not None
        return http_get(self.ops_port, path)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    # -- process control

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Whatever state it is in (stopped included): gone."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path, database: str) -> Iterator[Callable[..., Listener]]:
    """Start listeners on the test database; every one is killed at the end, pass or fail."""
    started: list[Listener] = []
    outbox = tmp_path / "outbox"

    def start(name: str, **kw: Any) -> Listener:
        kw.setdefault("outbox", outbox)
        proc = Listener(name, database, tmp_path, **kw)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def lease(database: str) -> tuple[str | None, int, bool]:
    rows = query(database, "select holder, fencing_token, expires_at > clock_timestamp() "
                           "from public.listener_lease where name = 'listener'")
    return rows[0] if rows else (None, 0, False)


def ledger_rows(database: str) -> list[dict[str, Any]]:
    rows = query(database, "select rule, session_id::text, due_at, state, holder, fencing_token, "
                           "attempts, detail, lateness_ms from public.listener_ledger "
                           "order by due_at, rule")
    names = ("rule", "session_id", "due_at", "state", "holder", "token", "attempts", "detail",
             "lateness_ms")
    return [dict(zip(names, row)) for row in rows]


def outbox_emails(outbox: Path) -> list[dict[str, Any]]:
    if not outbox.exists():
        return []
    return [json.loads(p.read_text("utf-8")) for p in sorted(outbox.glob("*.json"))]


def active(proc: Listener, count: int = 1) -> dict[str, Any]:
    """Holding the lease (the count-th time) and swept once since: the first
    reconcile of a term follows the subscription, so changes are followed."""
    acquired = proc.wait_for("lease_acquired", count)
    proc.wait_for("reconciled", count, first=True)
    return acquired


def dbname(conninfo: str) -> str:
    return psycopg.conninfo.conninfo_to_dict(conninfo)["dbname"]


def set_database_reachable(admin: str, database: str, reachable: bool) -> None:
    """Take the database away from every client (superusers included: unlike
    CONNECTION LIMIT, ALLOW_CONNECTIONS false binds them too) and cut the
    connections it has; or give it back."""
    name = dbname(database)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'alter database "{name}" allow_connections {str(reachable).lower()}')
        if not reachable:
            conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                         "where datname = %s and pid <> pg_backend_pid()", (name,))


def utc(seconds_from_now: float = 0.0) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)


# -- graceful shutdown ------------------------------------------------------------------------


def test_sigterm_exits_0_releases_the_lease_and_the_next_instance_acquires_at_once(
        spawn: Callable[..., Listener], database: str) -> None:
    seed_people(database)
    # A long lease: had the lease not been released, the next instance would
    # have to stand by for 30 s.
    a = spawn("a", lease_ttl="30s")
    active(a)
    insert_session(database, status="scheduled", scheduled_for=utc(2 * 86400))  # timers armed
    insert_session(database, status="waiting", mechanic_id=MECHANIC)  # actions under way
    wait_until(lambda: a.events("action"), what="a first action")
    _, token_a, _ = lease(database)

    sent = time.monotonic()
    a.signal(signal.SIGTERM)
    code = a.wait_exit(WAIT)
    shutdown_s = time.monotonic() - sent
    print(f"\n[shutdown] SIGTERM -> exit {code} in {shutdown_s:.2f} s")
    assert code == 0, a.tail()
    assert shutdown_s < 10.0  # SIGTERM: exit 0 within 10 s
    for event in ("stopping", "lease_released", "listener_stopped"):
        assert a.events(event), f"no {event}:\n{a.tail()}"
    holder, token, _ = lease(database)
    assert holder is None and token == token_a
    # Claims under way were finished, not left for the next instance to resume.
    assert {r["state"] for r in ledger_rows(database)} == {"fired"}

    b = spawn("b", lease_ttl="30s")
    acquired = b.wait_for("lease_acquired")
    started = b.wait_for("listener_started")
    print(f"[shutdown] next instance: listener_started -> lease_acquired in "
          f"{parse_ts(acquired['ts']) - parse_ts(started['ts']):.3f} s")
    assert acquired["token"] == token_a + 1
    assert not b.events("standing_by"), "the next instance waited for the lease"
    assert lease(database)[0] == "b"


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_shutdown_exits_at_once(
        spawn: Callable[..., Listener], database: str, second: int) -> None:
    a = spawn("a", lease_ttl="30s")
    active(a)
    # Hold the lease row: the graceful path then waits (up to 2 s) to release it,
    # so the second signal surely lands during the shutdown.
    with psycopg.connect(database) as locker:
        locker.execute("select 1 from public.listener_lease where name = 'listener' for update")
        a.signal(signal.SIGTERM)
        a.wait_for("stopping")
        wait_until(lambda: query(database, "select 1 from pg_stat_activity where datname = "
                                           "current_database() and wait_event_type = 'Lock'"),
                   what="the release waiting on the lock")
        sent = time.monotonic()
        a.signal(second)
        code = a.wait_exit(WAIT)
        elapsed = time.monotonic() - sent
        locker.rollback()
    print(f"\n[shutdown] second {signal.Signals(second).name} -> exit {code} in {elapsed:.3f} s")
    assert code == 128 + second  # os._exit: no cleanup
    assert a.events("second_signal")
    assert not a.events("listener_stopped") and not a.events("lease_released")
    # (The release statement already sent still completes once the lock goes;
    # a lease an exit left behind simply runs out, as after a crash.)


# -- readiness ------------------------------------------------------------------------------


def test_readiness_standby_active_and_database_down(
        spawn: Callable[..., Listener], database: str, pg_admin: str) -> None:
    a = spawn("a", ops=True)
    active(a)
    status, body = wait_until(lambda: (r := a.get("/readyz"))[0] == 200 and r,
                              what="a ready")
    assert body["role"] == "active" and all(body["checks"].values()), body

    b = spawn("b", ops=True)
    b.wait_for("standing_by")
    # Standing by is ready ("lease held or standing by"): a deploy starts
    # the new instance next to the old one and must see it ready.
    status, body = wait_until(lambda: (r := b.get("/readyz"))[0] == 200 and r,
                              what="the standby ready")
    assert body["role"] == "standby" and all(body["checks"].values()), body
    assert b.get("/healthz")[0] == 200
    assert a.metrics()[("listener_lease_held", ())] == 1.0
    assert b.metrics()[("listener_lease_held", ())] == 0.0

    set_database_reachable(pg_admin, database, False)
    try:
        for proc in (a, b):
            status, body = wait_until(
                lambda: (r := proc.get("/readyz"))[0] == 503
                and not r[1]["checks"]["database_reachable"] and r,
                what=f"{proc.name} not ready without its database")
            print(f"\n[readyz] {proc.name}, database down: {status} {body}")
            # Liveness is about the loop, not the database: no restart loop in an outage.
            assert proc.get("/healthz")[0] == 200
    finally:
        set_database_reachable(pg_admin, database, True)
    restored = time.monotonic()

    def both_ready() -> dict[str, str] | None:
        answers = {p.name: p.get("/readyz") for p in (a, b)}
        if all(status == 200 for status, _ in answers.values()):
            return {name: body["role"] for name, (_, body) in answers.items()}
        return None

    roles = wait_until(both_ready, what="both ready again")
    print(f"[readyz] back {time.monotonic() - restored:.2f} s after the database: {roles}")
    assert sorted(roles.values()) == ["active", "standby"]
    assert lease(database)[0] == next(n for n, r in roles.items() if r == "active")


def test_sigterm_during_a_database_outage_still_exits_within_10_s(
        spawn: Callable[..., Listener], database: str, pg_admin: str) -> None:
    a = spawn("a")
    active(a)
    b = spawn("b")
    b.wait_for("standing_by")
    set_database_reachable(pg_admin, database, False)
    try:
        # Both now try to (re)take the lease from a database that is not there.
        a.wait_for("lease_lost")
        b.wait_for("lease_error")
        time.sleep(0.5)
        sent = time.monotonic()
        for proc in (a, b):
            proc.signal(signal.SIGTERM)
        codes = {p.name: p.wait_exit(WAIT) for p in (a, b)}
        elapsed = time.monotonic() - sent
    finally:
        set_database_reachable(pg_admin, database, True)
    print(f"\n[shutdown] SIGTERM with the database down -> exit {codes} in {elapsed:.2f} s")
    assert codes == {"a": 0, "b": 0}
    assert elapsed < 10.0


# -- metrics --------------------------------------------------------------------------------


def test_metrics_after_actions(spawn: Callable[..., Listener], database: str) -> None:
    seed_people(database)
    a = spawn("a", ops=True)
    active(a)
    insert_session(database, status="pending")
    insert_session(database, status="pending", customer_user_id=None)  # no one to tell
    insert_session(database, status="scheduled", scheduled_for=utc(2 * 86400))
    wait_until(lambda: len([r for r in ledger_rows(database) if r["state"] != "claimed"]) == 4,
               what="four actions")

    def settled() -> dict | None:
        m = a.metrics()
        return m if m.get(("listener_timers_armed", ())) == 4.0 else None

    m = wait_until(settled, what="timers_armed 4")  # the scheduled session's 4 deadlines
    actions = {dict(labels)["rule"] + "/" + dict(labels)["outcome"]: value
               for (name, labels), value in m.items() if name == "listener_actions_total"}
    print(f"\n[metrics] actions {actions}; lateness sum "
          f"{m[('listener_firing_lateness_seconds_sum', ())]:.4f} s over "
          f"{m[('listener_firing_lateness_seconds_count', ())]:g}")
    assert actions == {"support_unassigned_alert/fired": 2.0, "request_expiry/fired": 1.0,
                       "request_expiry/failed": 1.0}
    assert m[("listener_firing_lateness_seconds_count", ())] == 4.0
    assert m[("listener_firing_lateness_seconds_bucket", (("le", "+Inf"),))] == 4.0
    assert any(name == "listener_firing_lateness_seconds_bucket" and dict(labels)["le"] == "0.5"
               for name, labels in m)
    assert m[("listener_lease_held", ())] == 1.0
    assert m[("listener_reconciles_total", ())] >= 1.0
    assert ("listener_email_failures_total", ()) in m
    # The failed one is in the ledger and the log, with its reason.
    failed = [r for r in ledger_rows(database) if r["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["rule"] == "request_expiry"
    assert "customer" in failed[0]["detail"]["email_errors"]
    logged = a.events("action", outcome="failed")
    assert len(logged) == 1 and logged[0]["level"] == "warning"


# -- failover -------------------------------------------------------------------------------


def test_failover_after_kill_9_fires_every_action_once(
        spawn: Callable[..., Listener], database: str, tmp_path: Path) -> None:
    seed_people(database)
    a = spawn("a", lease_ttl="2s")
    active(a)
    b = spawn("b", lease_ttl="2s")
    b.wait_for("standing_by")

    # Deadlines spread over the next ~8 s (RULES_TIME_SCALE=600), none before
    # +1.3 s but the first (+0.2 s), which proves a is acting.
    first = insert_session(database, status="live", mechanic_id=MECHANIC, started_at=utc(),
                           expires_at=utc(0.2))  # plan_time_expiry, summary_reminder +3 s later
    pending = insert_session(database, status="pending", status_changed_at=utc(1.0))
    waiting = [insert_session(database, status="waiting", mechanic_id=MECHANIC,
                              status_changed_at=utc(1.0 + 0.5 * i)) for i in range(3)]
    live = [insert_session(database, status="live", mechanic_id=MECHANIC, started_at=utc(),
                           expires_at=utc(1.5 + i)) for i in range(3)]
    expected = ({(r, s) for s in [first, *live]
                 for r in ("plan_time_expiry", "summary_reminder")}
                | {("support_unassigned_alert", pending), ("request_expiry", pending)}
                | {(r, s) for s in waiting
                   for r in ("mechanic_nudge", "support_stuck_alert", "waiting_timeout")})

    # Killed between two actions: a crash in the middle of one (a claim left
    # unfinished, resumed by the next holder) is test_kill_9_with_emails_queued_...
    wait_until(lambda: (rows := ledger_rows(database))
               and all(r["state"] != "claimed" for r in rows), what="a's first action")
    a.signal(signal.SIGKILL)
    killed = time.time()
    a.wait_exit(WAIT)
    done_by_a = {(r["rule"], r["session_id"]) for r in ledger_rows(database)}

    acquired = b.wait_for("lease_acquired")
    takeover_s = parse_ts(acquired["ts"]) - killed
    print(f"\n[failover] kill -9 -> b lease_acquired in {takeover_s:.2f} s (LEASE_TTL 2s)")
    assert acquired["token"] == 2

    def finished() -> bool:
        keys = {(r["rule"], r["session_id"]) for r in ledger_rows(database)
                if r["state"] != "claimed"}
        return keys >= expected

    wait_until(finished, what="every action recorded")
    time.sleep(0.5)  # anything extra (a duplicate) would show up now
    rows = ledger_rows(database)
    assert len(rows) == len(expected)  # one row per (rule, session, due)
    assert {(r["rule"], r["session_id"]) for r in rows} == expected
    assert all(r["state"] == "fired" for r in rows), [(r["rule"], r["state"]) for r in rows]
    assert {(r["rule"], r["session_id"]) for r in rows if r["holder"] == "a"} == done_by_a
    by_b = [r for r in rows if r["holder"] == "b"]
    gap = [r for r in by_b if killed <= r["due_at"].timestamp() <= parse_ts(acquired["ts"])]
    assert gap, "no action fell due between the kill and the takeover"
    print(f"[failover] {len(done_by_a)} action(s) by a, {len(by_b)} by b; {len(gap)} fell due "
          f"while nobody held the lease, fired by b up to "
          f"{max(r['lateness_ms'] for r in gap) / 1000:.2f} s late")
    assert all(r["attempts"] == 1 for r in rows)

    # The logs: each action reported once, across both processes.
    logged = Counter((e["rule"], e["session_id"], e["due_at"])
                     for p in (a, b) for e in p.events("action"))
    assert len(logged) == len(expected) and max(logged.values()) == 1

    # The outbox: one email per recipient per action, as the ledger says.
    emails = outbox_emails(tmp_path / "outbox")
    sent = Counter((e["rule"], e["session_id"], e["role"]) for e in emails)
    owed = Counter((r["rule"], r["session_id"], role) for r in rows
                   for role in r["detail"].get("recipients", []))
    assert sent == owed and max(sent.values()) == 1
    assert len(emails) == 4 + 2 + 3 * 3  # summary reminders, pending 2, waiting 3 each
    statuses = dict(query(database, "select id::text, status from public.sessions"))
    assert statuses[pending] == "expired"
    assert {statuses[s] for s in waiting} == {"cancelled"}
    assert {statuses[s] for s in [first, *live]} == {"completed"}
    assert not b.events("lease_lost")


# -- fencing --------------------------------------------------------------------------------


def test_a_stale_instance_waking_up_changes_nothing(
        spawn: Callable[..., Listener], database: str, tmp_path: Path) -> None:
    seed_people(database)
    a = spawn("a", lease_ttl="2s")
    active(a)
    b = spawn("b", lease_ttl="2s")
    b.wait_for("standing_by")

    before = insert_session(database, status="pending")
    wait_until(lambda: [r for r in ledger_rows(database)
                        if r["rule"] == "support_unassigned_alert" and r["state"] == "fired"],
               what="a first action by a")
    a.signal(signal.SIGSTOP)  # a freezes with request_expiry of `before` armed (+1.5 s)
    stopped = time.monotonic()
    try:
        rows_of_a = [(r["rule"], r["session_id"], r["token"])
                     for r in ledger_rows(database) if r["holder"] == "a"]
        assert rows_of_a == [("support_unassigned_alert", before, 1)]
        b.wait_for("lease_acquired")  # only once a's lease ran out
        # A session born during the pause: a hears of it (NOTIFY) when it wakes.
        during = insert_session(database, status="waiting", mechanic_id=MECHANIC)
        owed = {("request_expiry", before), ("mechanic_nudge", during),
                ("support_stuck_alert", during)}
        wait_until(lambda: owed <= {(r["rule"], r["session_id"]) for r in ledger_rows(database)
                                    if r["holder"] == "b" and r["state"] == "fired"},
                   what="b's actions")
        emails_before = Counter((e["rule"], e["session_id"], e["role"])
                                for e in outbox_emails(tmp_path / "outbox"))
        statuses_before = query(database, "select id::text, status, metadata, status_changed_at "
                                          "from public.sessions order by id")
    finally:
        a.signal(signal.SIGCONT)
    paused = time.monotonic() - stopped
    woke = len(a.lines())

    lost = a.wait_for("lease_lost")
    a.wait_for("standing_by")  # a stands by behind b
    time.sleep(1.0)  # room for anything a might still try
    print(f"\n[fencing] a paused {paused:.2f} s (LEASE_TTL 2s); on waking: lease_lost "
          f"({lost['reason']}), then standing_by")

    assert [(r["rule"], r["session_id"], r["token"]) for r in ledger_rows(database)
            if r["holder"] == "a"] == rows_of_a
    assert not [e for e in a.lines()[woke:] if e.get("event") == "action"]
    emails = Counter((e["rule"], e["session_id"], e["role"])
                     for e in outbox_emails(tmp_path / "outbox"))
    assert max(emails.values()) == 1
    assert set(emails) - set(emails_before) <= {("waiting_timeout", during, "support")}
    statuses = query(database, "select id::text, status, metadata, status_changed_at "
                               "from public.sessions order by id")
    changed = [row[0] for row, old in zip(statuses, statuses_before) if row != old]
    assert changed in ([], [during])  # only b's waiting_timeout may have come due since
    expired = dict((sid, meta) for sid, _, meta, _ in statuses)[before]
    assert expired["listener"]["rule"] == "request_expiry"
    holder, token, live_lease = lease(database)
    assert (holder, token, live_lease) == ("b", 2, True)
    assert not b.events("lease_lost")


def test_sql_functions_refuse_a_stale_fencing_token(database: str) -> None:
    """The fence in the database itself: whatever a stale instance sends, with
    its old (holder, token), changes nothing."""
    seed_people(database)
    sid = insert_session(database, status="pending", metadata={"keep": 1})
    due = datetime(2026, 3, 2, 10, 15, tzinfo=timezone.utc)
    with psycopg.connect(database, autocommit=True) as conn:
        def call(sql: str, *params: Any) -> Any:
            return conn.execute(sql, params).fetchone()[0]

        fire = ("select public.listener_fire_v2(p_table => 'sessions', p_key_column => 'id', "
                "p_status_column => 'status', p_columns => array['id', 'status'], "
                "p_rule => %s, p_key => %s, p_due_at => %s, p_holder => %s, p_token => %s, "
                "p_fired_at => now()")

        def claim(rule: str, holder: str, token: int) -> dict[str, Any]:
            """Claim only (no status change, not finished)."""
            return call(fire + ")", rule, sid, due, holder, token)

        def transition(holder: str, token: int) -> dict[str, Any]:
            """request_expiry's claim and compare-and-set, in one call."""
            return call(fire + ", p_expected => array['pending'], p_status => 'expired', "
                        "p_reason => 'no_mechanic_available')",
                        "request_expiry", sid, due, holder, token)

        def complete(holder: str, token: int) -> bool:
            return call("select public.listener_complete_v2('request_expiry', 'sessions', %s, "
                        "%s, %s, %s, 'fired', now(), 0, '{}'::jsonb)", sid, due, holder, token)

        def ledger_now() -> list[tuple]:
            return query(database, "select holder, fencing_token, state, status_applied, "
                                   "attempts from public.listener_ledger")

        def session_now() -> tuple:
            return query(database, "select status, metadata from public.sessions where id = %s",
                         sid)[0]

        token_a = call("select public.listener_lease_acquire('a', 300)")
        assert claim("request_expiry", "a", token_a)["outcome"] == "claimed"
        time.sleep(0.5)  # a's lease runs out: even with no successor, a is fenced
        assert claim("support_unassigned_alert", "a", token_a) == {"outcome": "fenced"}

        token_b = call("select public.listener_lease_acquire('b', 60000)")
        assert token_b == token_a + 1
        # a, stale, with the claim it made in time: nothing goes through.
        assert claim("support_unassigned_alert", "a", token_a) == {"outcome": "fenced"}
        assert claim("request_expiry", "a", token_a) == {"outcome": "fenced"}
        assert transition("a", token_a) == {"outcome": "fenced"}
        assert complete("a", token_a) is False
        # claim, change and finish in one call: fenced as well
        assert call(fire + ", p_finish => 'fired')", "request_expiry", sid, due, "a",
                    token_a) == {"outcome": "fenced"}
        assert call("select public.listener_lease_renew('a', %s, 60000)", token_a) is False
        assert call("select public.listener_lease_release('a', %s)", token_a) is False
        # The holder's name is not enough: the token must match.
        assert claim("support_unassigned_alert", "b", token_a) == {"outcome": "fenced"}
        assert transition("b", token_a) == {"outcome": "fenced"}
        assert session_now() == ("pending", {"keep": 1})
        assert ledger_now() == [("a", token_a, "claimed", False, 1)]

        # b takes over a's unfinished claim, acts and records it; a still cannot.
        resumed = transition("b", token_b)
        assert {k: resumed[k] for k in ("outcome", "status_applied", "attempts")} == {
            "outcome": "claimed", "status_applied": True, "attempts": 2}
        assert transition("a", token_a) == {"outcome": "fenced"}  # b's claim now
        assert complete("a", token_a) is False
        assert complete("b", token_b) is True
        assert complete("b", token_b) is False  # once
        assert ledger_now() == [("b", token_b, "fired", True, 2)]
        status, metadata = session_now()
        assert status == "expired" and metadata["keep"] == 1
        assert metadata["listener"]["rule"] == "request_expiry"
        assert call("select holder from public.listener_lease") == "b"


# -- an action whose email waits its turn must not run twice -------------------------------
#
# While an action's email waits behind the rate limit, its claim is `claimed`
# in the ledger; only the executor's `in_flight` set tells "being worked on here"
# from "left unfinished by a crash". Two ways to run it twice:
#  1. the key leaves `in_flight` before the email is sent, and the next
#     reconcile "resumes" the claim (committed executor: `_run`'s `finally`
#     discarded the key `_act` had just handed to the background);
#  2. after a takeover, the first sweep resumes the claims the dead holder left
#     and arms the same deadlines as timers; the timer path (`Executor.run`)
#     does not look at `in_flight`, so it claims again what the resume is
#     emailing.
# Either way it would be claimed again, emailed again (the idempotency key
# drops the copy), and logged, counted and published twice. The executor keeps
# a key in `in_flight` until its background work is done, and `Executor.run`
# returns early for a key already there; these two tests hold it to that.


def settle(*procs: Listener, quiet_s: float = 1.5) -> None:
    """Wait until no action was reported for quiet_s (late copies included)."""
    last: list[int] = []
    since = time.monotonic()

    def still() -> bool:
        nonlocal last, since
        now = [len(p.events("action")) + len(p.events("complete_fenced")) for p in procs]
        if now != last:
            last, since = now, time.monotonic()
        return time.monotonic() - since >= quiet_s

    wait_until(still, what="quiet logs", interval=0.1)


def reported_once(database: str, *procs: Listener, max_attempts: int = 1) -> None:
    """Every action claimed (at most max_attempts times: a crash costs one more),
    completed once and reported by exactly one log line."""
    settle(*procs)
    rows = ledger_rows(database)
    logged = Counter((e["rule"], e["session_id"], round(parse_ts(e["due_at"]), 6))
                     for p in procs for e in p.events("action"))
    refused = [e for p in procs for e in p.events("complete_fenced")]
    print(f"\n[in_flight] attempts per claim {sorted(r['attempts'] for r in rows)}; "
          f"action lines per action {sorted(logged.values())}; "
          f"{len(refused)} completion(s) refused")
    assert {r["state"] for r in rows} == {"fired"}
    assert max(r["attempts"] for r in rows) <= max_attempts
    assert set(logged) == {(r["rule"], r["session_id"], round(r["due_at"].timestamp(), 6))
                           for r in rows}
    assert max(logged.values()) == 1
    assert not refused


NO_TIMEOUT = {"RULE_WAITING_TIMEOUT": "off"}  # only the nudge and the alert: 2 emails a session
RESEND_KEY = "re_test_123456789"


def test_a_reconcile_while_emails_wait_their_turn_runs_nothing_again(
        spawn: Callable[..., Listener], database: str) -> None:
    seed_people(database)
    # One email a second, a sweep every second: the sweeps come while emails wait.
    a = spawn("a", RESEND_RATE_LIMIT="1", RECONCILE_INTERVAL="1s", **NO_TIMEOUT)
    active(a)
    for _ in range(2):  # nudge and stuck alert of each due at once: 4 emails, ~4 s
        insert_session(database, status="waiting", mechanic_id=MECHANIC,
                       status_changed_at=utc(-1.0))
    wait_until(lambda: len([r for r in ledger_rows(database) if r["state"] == "fired"]) == 4,
               what="four actions")
    reported_once(database, a)


def test_kill_9_with_emails_queued_each_action_still_runs_once(
        spawn: Callable[..., Listener], database: str) -> None:
    seed_people(database)
    # Each instance mails through its own test Resend server, which holds every
    # send until the test releases it: a dies with all its emails unsent, and b
    # keeps its resumed emails in flight while its timers for the same
    # deadlines come due, whichever path claims first.
    with ResendServer(RESEND_KEY, rate_limit=None) as resend_a, \
            ResendServer(RESEND_KEY, rate_limit=None) as resend_b:
        resend_a.hold()  # never released: what a sent never arrives
        resend_b.hold()
        a = spawn("a", lease_ttl="2s", RESEND_API_KEY=RESEND_KEY, RESEND_API_URL=resend_a.url,
                  **NO_TIMEOUT)
        active(a)
        b = spawn("b", lease_ttl="2s", RESEND_API_KEY=RESEND_KEY, RESEND_API_URL=resend_b.url,
                  **NO_TIMEOUT)
        b.wait_for("standing_by")
        sids = [insert_session(database, status="waiting", mechanic_id=MECHANIC,
                               status_changed_at=utc(-1.0)) for _ in range(2)]
        # a claims all four (nudge and stuck alert of each) and sends their emails
        # (in one batch or several: what is held is requests).
        wait_until(lambda: resend_a.held and len(
            [r for r in ledger_rows(database) if r["state"] == "claimed"]) == 4,
            what="a's emails held")
        time.sleep(0.5)
        a.signal(signal.SIGKILL)
        a.wait_exit(WAIT)
        rows = ledger_rows(database)
        assert [(r["state"], r["holder"], r["attempts"]) for r in rows] == [("claimed", "a", 1)] * 4
        b.wait_for("lease_acquired")
        b.wait_for("reconciled", first=True)  # a's claims resumed, their deadlines armed
        # b resumes each claim once: four emails in flight, and no second claim
        # or send for any of them while they stay in flight (at 2 emails a
        # second the last one leaves 1.5 s after the first: the timers, due
        # in the past, have come due by then).
        wait_until(lambda: resend_b.held and all(
            (r["state"], r["holder"], r["attempts"]) == ("claimed", "b", 2)
            for r in ledger_rows(database)), what="b's emails held")
        time.sleep(0.5)
        held_by_b = len(resend_b.requests)
        assert 1 <= held_by_b <= 4
        resend_b.release()
        wait_until(lambda: len([r for r in ledger_rows(database) if r["state"] == "fired"]) == 4,
                   what="every action recorded")
        settle(a, b)
        # Each email once (by its own ref: a batch shares one request key), none from a.
        delivered = Counter(d.headers.get("X-Entity-Ref-ID") for d in resend_b.delivered)
        assert len(delivered) == 4 and max(delivered.values()) == 1 and not resend_a.delivered
        assert len(resend_b.requests) == held_by_b  # nothing sent again
    assert {r["session_id"] for r in ledger_rows(database)} == set(sids)
    reported_once(database, a, b, max_attempts=2)
