"""Properties over random lifecycles of two tables (hypothesis), checked by an
oracle that shares no code with the engine.

The oracle reads the raw rows with datetime and the rule declarations only
(statuses, present, absent, anchors, signed offset, set_status, lateness); it
knows the plan end from its definition: the later of expires_at and
started_at + PLAN_MINUTES[plan] + the session's extension minutes, none for an
unknown or null plan. It plays the whole replay itself - changes at their
instant before timers due then, timers by due instant, then rule order across
packs and files, then key - and the engine's output must be the oracle's, line
for line.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from listener.changes import change_from_payload
from listener.replay import Replay, run_replay
from listener.rules import load_rules
from listener.rules.model import Outcome, RuleSet
from listener.store import ActionKey
from tests.helpers import MECH, T0, event, iso, row

HOLDS_RULES = Path(__file__).parent / "rules" / "holds.toml"
RULESET = load_rules({}, [HOLDS_RULES])
SESSIONS, EXTENSIONS, HOLDS = "sessions", "session_extensions", "test_holds"
STATUSES = ["pending", "scheduled", "accepted", "waiting", "live", "reconnecting", "completed",
            "cancelled", "expired", "on_hold"]
HOLD_STATUSES = ["reserved", "reserved", "confirmed", "expired", "cancelled"]
# The same key texts in two tables: a row is (table, key), never the key alone.
SESSION_KEYS = ["a", "b", "c"]
HOLD_KEYS = ["a", "b"]
EXTENSION_KEYS = ["x1", "x2", "x3"]
PLANS = [None, None, "chat10", "video15", "free", "gold"]  # gold: no such plan

# The plan lengths of the app's pricing, restated here rather than read from the pack.
PLAN_MINUTES = {"chat10": 30, "video15": 45, "diagnostic": 60, "free": 5, "trial": 5,
                "trial-free": 5}
MAX_NOTIFY_LATENESS = timedelta(hours=1)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
S = "status_changed_at"


# -- the oracle ------------------------------------------------------------------------

def when(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def micros(value: datetime) -> int:
    return (value - EPOCH) // timedelta(microseconds=1)


def oracle_due(rule, raw: dict | None, extensions: list[dict],
               plan_minutes: dict[str, float] = PLAN_MINUTES) -> datetime | None:
    """The rule's due instant for a raw row, from the declaration alone."""
    if raw is None:
        return None
    if rule.statuses and raw.get("status") not in rule.statuses:
        return None
    if any(raw.get(c) is None for c in rule.present):
        return None
    if any(raw.get(c) is not None for c in rule.absent):
        return None
    anchors = []
    for name in rule.anchor:
        if name == "plan_end":
            value = plan_end(raw, extensions, plan_minutes)
        else:
            value = when(raw.get(name))
        if value is not None:
            anchors.append(value)
    if not anchors:
        return None
    return max(anchors) + timedelta(microseconds=rule.offset)


def plan_end(raw: dict, extensions: list[dict], plan_minutes: dict[str, float]) -> datetime | None:
    started = when(raw.get("started_at"))
    if started is None or raw.get("plan") not in plan_minutes:
        return None
    extra = sum(e.get("minutes") or 0 for e in extensions if e.get("session_id") == raw["id"])
    return started + timedelta(minutes=plan_minutes[raw["plan"]] + extra)


class Oracle:
    """The replay, restated on raw rows: its own copy of the database, its own clock."""

    def __init__(self, ruleset: RuleSet, plan_minutes: dict[str, float] = PLAN_MINUTES) -> None:
        self.rules = list(ruleset.rules)  # table order
        self.plan_minutes = plan_minutes
        self.db: dict[str, dict[str, dict]] = {t: {} for t in (SESSIONS, EXTENSIONS, HOLDS)}
        self.fired: set[tuple[str, str, str, datetime]] = set()
        self.clock = datetime.min.replace(tzinfo=timezone.utc)
        self.out: list[tuple] = []

    def owed(self, limit: datetime) -> list[tuple[datetime, int, str, str]]:
        extensions = list(self.db[EXTENSIONS].values())
        found = []
        for index, rule in enumerate(self.rules):
            for key, raw in self.db.get(rule.table, {}).items():
                due = oracle_due(rule, raw, extensions, self.plan_minutes)
                if due is not None and due <= limit \
                        and (rule.name, rule.table, key, due) not in self.fired:
                    found.append((due, index, key, rule.table))
        return found

    def fire_until(self, limit: datetime) -> None:
        while owed := self.owed(limit):
            due, index, key, table = min(owed)
            rule = self.rules[index]
            self.fired.add((rule.name, table, key, due))
            self.clock = max(self.clock, due)
            late = self.clock - due
            if rule.lateness.value == "skip_past_quarter":
                if late * 4 > timedelta(microseconds=abs(rule.offset)):
                    continue  # skipped: recorded, never printed
                is_late = False
            else:
                is_late = late > MAX_NOTIFY_LATENESS
            if rule.set_status:
                raw = self.db[table][key]
                raw["status"], raw[S] = rule.set_status, self.clock
                if rule.set_status == "completed" and "ended_at" in raw \
                        and raw["ended_at"] is None:
                    raw["ended_at"] = self.clock
            self.out.append((micros(self.clock), rule.name, table, key, micros(due),
                             rule.set_status, rule.reason, is_late))

    def apply(self, line: dict) -> None:
        at = max(when(line["at"]), self.clock)
        self.fire_until(at - timedelta(microseconds=1))
        self.clock = at
        table = line.get("table") or SESSIONS
        if line["type"] == "DELETE":
            self.db[table].pop(line["old_record"]["id"], None)
            return
        record = dict(line["record"])
        previous = self.db[table].get(record["id"])
        if table != EXTENSIONS and record.get(S) is None:
            same = previous is not None and previous["status"] == record["status"]
            record[S] = previous.get(S) if same else at
        self.db[table][record["id"]] = record

    def run(self, lines: list[dict]) -> list[tuple]:
        for line in lines:
            self.apply(line)
        self.fire_until(datetime.max.replace(tzinfo=timezone.utc))
        return self.out


# -- random lifecycles -------------------------------------------------------------------

def maybe_time(minutes: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), minutes.map(lambda m: T0 + timedelta(minutes=m)))


# Few distinct instants, so rows come back with the same anchors and deadlines of
# the two tables coincide.
INSTANTS = st.sampled_from([-300, -20, 0, 10, 30, 100, 1500])


@st.composite
def session_record(draw, plans=PLANS, statuses=STATUSES, starts=INSTANTS,
                   expiries=INSTANTS) -> dict:
    return row(draw(st.sampled_from(SESSION_KEYS)), draw(st.sampled_from(statuses)),
               plan=draw(st.sampled_from(plans)),
               mechanic_id=draw(st.sampled_from([None, MECH])),
               scheduled_for=draw(maybe_time(INSTANTS)), started_at=draw(maybe_time(starts)),
               expires_at=draw(maybe_time(expiries)), ended_at=draw(maybe_time(INSTANTS)),
               summary_submitted_at=draw(maybe_time(INSTANTS)))


@st.composite
def hold_record(draw) -> dict:
    return {"id": draw(st.sampled_from(HOLD_KEYS)), "status": draw(st.sampled_from(HOLD_STATUSES)),
            "expires_at": iso(draw(maybe_time(INSTANTS))),
            "confirmed_at": iso(draw(st.one_of(st.none(), st.none(), maybe_time(INSTANTS)))),
            "created_at": iso(T0 + timedelta(minutes=draw(INSTANTS)))}


@st.composite
def extension_record(draw) -> dict:
    return {"id": draw(st.sampled_from(EXTENSION_KEYS)),
            "session_id": draw(st.sampled_from([*SESSION_KEYS, None])),
            "minutes": draw(st.sampled_from([0, 5, 10, 15, 30])),
            "payment_intent_id": "pi_" + draw(st.sampled_from(EXTENSION_KEYS))}


@st.composite
def lifecycles(draw, tables=(SESSIONS, SESSIONS, HOLDS, EXTENSIONS), plans=PLANS,
               steps=(0, 0, 0, 1, 2, 3, 5, 14, 15, 60, 200, 1500),
               sessions=None) -> list[dict]:
    events, clock = [], 0
    records = {SESSIONS: session_record(plans) if sessions is None else sessions, HOLDS: hold_record(),
               EXTENSIONS: extension_record()}
    for _ in range(draw(st.integers(1, 14))):
        clock += draw(st.sampled_from(steps))
        table = draw(st.sampled_from(tables))
        kind = draw(st.sampled_from(["INSERT", "UPDATE", "UPDATE", "UPDATE", "DELETE"]))
        line = event(T0 + timedelta(minutes=clock), kind, draw(records[table]))
        line["table"] = table
        events.append(line)
    return events


# -- the engine, watched -----------------------------------------------------------------

def run(events: list[dict], ruleset: RuleSet = RULESET):
    """Replay, recording the raw row (and the extensions) each action acted on when it
    claimed."""
    replay = Replay(ruleset)
    seen: list[tuple[ActionKey, dict, list[dict]]] = []
    fire = replay.store.fire

    async def spying_fire(request, fence):
        key = request.key
        before = dict(replay.store.tables.get(key.table, {}).get(key.row_key) or {})
        extensions = [dict(e) for e in replay.store.tables.get(EXTENSIONS, {}).values()]
        answer = await fire(request, fence)
        if answer.outcome == "claimed" and request.finish != Outcome.SKIPPED.value:
            seen.append((key, before, extensions))
        return answer

    replay.store.fire = spying_fire  # type: ignore[method-assign]

    async def go():
        for e in events:
            await replay.apply(change_from_payload(e, key_columns=replay.keys, require_at=True))
        await replay.finish(None)

    asyncio.run(go())
    return replay.results, seen


def as_lines(results) -> list[tuple]:
    return [(r.fired_at, r.key.rule, r.key.table, r.key.row_key,
             r.key.due_at, r.status, r.reason, r.outcome is Outcome.LATE) for r in results]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lifecycles())
def test_lifecycle_properties(events) -> None:
    results, seen = run(events)
    keys = [r.key for r in results]
    assert len(keys) == len(set(keys)), "an episode fired twice"
    for result in results:
        assert result.fired_at >= result.key.due_at, "fired before its due instant"
    for key, raw, extensions in seen:
        due = oracle_due(RULESET.by_name(key.rule), raw, extensions)
        assert due is not None, f"{key.rule} fired while its condition did not hold: {raw}"
        assert micros(due) == key.due_at, f"{key.rule}: due instant differs from the oracle's"
    instants = [r.fired_at for r in results]
    assert instants == sorted(instants), "the clock went back"
    # The whole output, in order: ties by due instant, rule order, then key.
    assert as_lines(results) == Oracle(RULESET).run(events)


# Live sessions with plans and extensions that come, change and go before the plan ends.
PAID_TIME = lifecycles(
    tables=(SESSIONS, EXTENSIONS), steps=(0, 1, 5, 10, 20),
    sessions=session_record(statuses=["live", "live", "reconnecting", "completed"],
                            starts=st.sampled_from([0, 10, 30]),
                            expiries=st.sampled_from([20, 40, 60, 200])))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PAID_TIME)
def test_paid_time_matches_the_oracle(events) -> None:
    results, _ = run(events)
    assert as_lines(results) == Oracle(RULESET).run(events)


# Changes crowded on a few instants: deadlines of both tables fall together.
CROWDED = lifecycles(tables=(SESSIONS, HOLDS), steps=(0, 0, 5))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CROWDED)
def test_crowded_ties_match_the_oracle(events) -> None:
    results, _ = run(events)
    assert as_lines(results) == Oracle(RULESET).run(events)


@settings(max_examples=40, deadline=None)
@given(lifecycles())
def test_same_input_same_output(events) -> None:
    first, _ = run(events)
    second, _ = run(events)
    assert as_lines(first) == as_lines(second)


@settings(max_examples=60, deadline=None)
@given(lifecycles())
def test_each_row_keeps_the_heap_entries_of_what_it_owes(events) -> None:
    """A popped entry fires only if its row still holds it: what a row holds must be
    exactly what its rules owe now, soonest first, the soonest in the heap, through
    changes and fires."""
    replay = Replay(RULESET)

    def check(engine) -> None:
        heap = set(engine._heap)
        for ts in engine.tables.values():
            for state in ts.rows.values():
                owed = sorted((due, index, state._key) for index, due in engine.pending(ts, state))
                assert list(state._queued) == sorted(owed)
                assert not owed or state._queued[0] in heap

    async def go():
        engine = replay.engine
        for e in events:
            await replay.apply(change_from_payload(e, key_columns=replay.keys, require_at=True))
            check(engine)
        await replay.finish(None)
        check(engine)

    asyncio.run(go())


@settings(max_examples=60, deadline=None)
@given(lifecycles())
def test_engine_counters_match_the_heap(events) -> None:
    replay = Replay(RULESET)

    async def go():
        engine = replay.engine
        for e in events:
            await replay.apply(change_from_payload(e, key_columns=replay.keys, require_at=True))
            expected = sum(len(engine.pending(ts, s)) for ts in engine.tables.values()
                           for s in ts.rows.values())
            assert engine.armed == expected
        await replay.finish(None)
        assert engine.armed == 0

    asyncio.run(go())


def test_the_rules_file_comes_after_the_pack_in_table_order() -> None:
    names = [r.name for r in RULESET.rules]
    assert names[-3:] == ["hold_warning", "hold_expiry", "hold_followup"]
    assert names.index("plan_time_expiry") < names.index("hold_warning")


def test_ties_go_by_rule_order_across_tables_then_key() -> None:
    # Deadlines fall together at 10:05 (S + 5m in both tables) and 10:15
    # (request_expiry of two sessions, hold_expiry of a hold whose key sorts first).
    at = iso(T0)
    lines = [
        {"at": at, "type": "INSERT", "table": HOLDS,
         "record": {"id": "a", "status": "reserved", "expires_at": iso(T0 + timedelta(minutes=15)),
                    "created_at": at}},
        {"at": at, "type": "INSERT", "table": SESSIONS, "record": row("c")},
        {"at": at, "type": "INSERT", "table": SESSIONS,
         "record": row("b", scheduled_for=T0 + timedelta(days=2))},
    ]
    results, _ = run(lines)
    assert [(r.key.rule, r.key.table, r.key.row_key, (r.fired_at - micros(T0)) // 60_000_000)
            for r in results] == [
        ("support_unassigned_alert", SESSIONS, "c", 5), ("hold_followup", HOLDS, "a", 5),
        ("request_expiry", SESSIONS, "b", 15), ("request_expiry", SESSIONS, "c", 15),
        ("hold_expiry", HOLDS, "a", 15),
        # Expiring re-entered a status: the follow-up is owed again, from then.
        ("hold_followup", HOLDS, "a", 20)]
    assert as_lines(results) == Oracle(RULESET).run(lines)


def test_plan_time_and_the_three_hour_limit_both_overdue_end_by_the_plan() -> None:
    lines = [{"at": iso(T0), "type": "INSERT", "table": SESSIONS,
              "record": row("s", "live", plan="chat10", started_at=T0 - timedelta(hours=4))}]
    results, _ = run(lines)
    assert [(r.key.rule, r.status) for r in results][:1] == [("plan_time_expiry", "completed")]
    assert as_lines(results) == Oracle(RULESET).run(lines)


def test_output_is_json_lines() -> None:
    from listener.instants import parse_instant
    out = io.StringIO()
    # A pending request nobody takes: it expires, so replay must write lines.
    asyncio.run(run_replay([json.dumps(event(T0, "INSERT", row()))], RULESET, out, io.StringIO()))
    lines = out.getvalue().splitlines()
    assert lines, "replay wrote nothing"
    for line in lines:
        action = json.loads(line)
        assert isinstance(action, dict), line
        assert {"at", "rule", "table", "row_id", "session_id", "due_at"} <= action.keys(), line
        assert action["session_id"] == "s1" and action["rule"] in {r.name for r in RULESET.rules}, line
        assert parse_instant(action["at"]) >= parse_instant(action["due_at"]), line
        assert ("status" in action) == ("reason" in action), line


# -- release 1 compatibility -------------------------------------------------------------

RELEASE_1 = "fca1826"
REPO = Path(__file__).resolve().parent.parent
# Runs every log through one process's replay: {"logs": [[line, ...], ...]} -> outputs.
REPLAY_MANY = """
import asyncio, io, json, sys
import listener
from listener.replay import run_replay
from listener.rules import load_rules
logs = json.load(open(sys.argv[1]))
rules = load_rules({})
outputs = []
for lines in logs:
    out, err = io.StringIO(), io.StringIO()
    asyncio.run(run_replay(lines, rules, out, err))
    outputs.append(out.getvalue().splitlines())
json.dump({"listener": listener.__file__, "outputs": outputs}, open(sys.argv[2], "w"))
"""
# What release 1 printed; release 2 adds the table, the row id and the webhook.
RELEASE_2_FIELDS = ("table", "row_id", "webhook")


def session_only_logs(count: int, seed: int) -> list[list[str]]:
    """Logs release 1 could replay: sessions only, no plan, no extensions."""
    rng = random.Random(seed)
    minutes = [-1500, -300, -61, -20, 0, 3, 10, 30, 59, 100, 180, 1440, 1500]
    logs = []
    for _ in range(count):
        clock, lines = 0, []
        for _ in range(rng.randint(1, 15)):
            clock += rng.choice([0, 0, 1, 2, 3, 5, 14, 15, 30, 60, 200, 1500])
            stamp = clock + (rng.choice([-30, -1]) if rng.random() < 0.05 else 0)  # clock never goes back
            sid = rng.choice(["a", "b", "c"])
            kind = rng.choice(["INSERT", "UPDATE", "UPDATE", "UPDATE", "DELETE"])

            def maybe() -> datetime | None:
                return None if rng.random() < 0.5 else T0 + timedelta(minutes=rng.choice(minutes))

            record = row(sid, rng.choice(STATUSES), mechanic_id=rng.choice([None, MECH]),
                         scheduled_for=maybe(), started_at=maybe(), expires_at=maybe(),
                         ended_at=maybe(), summary_submitted_at=maybe())
            if rng.random() < 0.1:
                record["status_changed_at"] = iso(T0 + timedelta(minutes=clock - rng.choice([0, 4, 90])))
            if rng.random() < 0.03:
                record["started_at"] = "not a time"
            lines.append(json.dumps(event(T0 + timedelta(minutes=stamp), kind, record)))
        logs.append(lines)
    return logs


def replay_many(root: Path, logs_file: Path, tmp_path: Path, name: str) -> dict:
    script, result = tmp_path / "replay_many.py", tmp_path / f"{name}.json"
    script.write_text(REPLAY_MANY)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE_", "RULES_")) and k not in ("PLAN_MINUTES",
                                                                  "MAX_NOTIFY_LATENESS")}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, str(script), str(logs_file), str(result)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(result.read_text())
    assert answer["listener"].startswith(str(root)), answer["listener"]
    return answer


def test_sessions_output_is_release_ones_on_release_one_logs(tmp_path) -> None:
    release_1 = tmp_path / "release1"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(release_1),
                    RELEASE_1], check=True, capture_output=True, timeout=60)
    try:
        logs = session_only_logs(200, seed=20260302)
        logs_file = tmp_path / "logs.json"
        logs_file.write_text(json.dumps(logs))
        old = replay_many(release_1, logs_file, tmp_path, "release1")["outputs"]
        new = replay_many(REPO, logs_file, tmp_path, "release2")["outputs"]
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(release_1)],
                       capture_output=True, timeout=60)
    assert sum(map(len, old)) > 500, "the logs should make release 1 act"
    for number, (lines_1, lines_2) in enumerate(zip(old, new)):
        ours = []
        for line in lines_2:
            obj = json.loads(line)
            for field in RELEASE_2_FIELDS:
                obj.pop(field, None)
            ours.append(obj)
        assert ours == [json.loads(x) for x in lines_1], f"log {number}: {logs[number]}"
