"""Properties over random lifecycles (hypothesis), checked by an oracle that
shares no code with the engine: it reads the raw rows with datetime."""
from __future__ import annotations

import asyncio
import io
import json
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings, strategies as st

from listener.replay import Replay
from listener.store import ActionKey
from listener.rules import load_rules
from tests.helpers import MECH, T0, event, iso, row

TABLE = load_rules({})
STATUSES = ["pending", "scheduled", "accepted", "waiting", "live", "reconnecting", "completed",
            "cancelled", "expired", "on_hold"]
SIDS = ["a", "b", "c"]


def maybe_time(draw_minutes: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), draw_minutes.map(lambda m: T0 + timedelta(minutes=m)))


@st.composite
def lifecycles(draw):
    events, clock = [], 0
    for _ in range(draw(st.integers(1, 14))):
        clock += draw(st.sampled_from([0, 0, 1, 2, 3, 5, 14, 15, 60, 200, 1500]))
        sid = draw(st.sampled_from(SIDS))
        kind = draw(st.sampled_from(["INSERT", "UPDATE", "UPDATE", "UPDATE", "DELETE"]))
        # Few distinct instants, so rows come back with the same anchors.
        minutes = st.sampled_from([-300, -20, 0, 10, 30, 100, 1500])
        record = row(sid, draw(st.sampled_from(STATUSES)),
                     mechanic_id=draw(st.sampled_from([None, MECH])),
                     scheduled_for=draw(maybe_time(minutes)), started_at=draw(maybe_time(minutes)),
                     expires_at=draw(maybe_time(minutes)), ended_at=draw(maybe_time(minutes)),
                     summary_submitted_at=draw(maybe_time(minutes)))
        events.append(event(T0 + timedelta(minutes=clock), kind, record))
    return events


def parse(value):
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def oracle_due(rule, raw: dict) -> datetime | None:
    """The rule's due instant for a raw row, computed independently of the engine."""
    if raw.get("status") not in rule.when.statuses:
        return None
    if any(raw.get(c) is None for c in rule.when.present):
        return None
    if any(raw.get(c) is not None for c in rule.when.absent):
        return None
    anchors = [parse(raw.get(c)) for c in rule.anchor if raw.get(c) is not None]
    if not anchors:
        return None
    return max(anchors) + rule.direction * timedelta(microseconds=rule.offset)


def run(events):
    """Replay, recording the raw row each action acted on when it claimed."""
    replay = Replay(TABLE)
    seen: list[tuple[ActionKey, dict]] = []
    fire = replay.store.fire

    async def spying_fire(request, fence):
        before = dict(replay.store.rows.get(request.key.session_id) or {})
        answer = await fire(request, fence)
        if answer.outcome == "claimed" and request.finish != "skipped":
            seen.append((request.key, before))
        return answer

    replay.store.fire = spying_fire  # type: ignore[method-assign]

    async def go():
        for e in events:
            from listener.changes import change_from_payload
            await replay.apply(change_from_payload(e, require_at=True))
        await replay.finish(None)

    asyncio.run(go())
    return replay.results, seen


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lifecycles())
def test_lifecycle_properties(events) -> None:
    results, seen = run(events)
    keys = [r.key for r in results]
    assert len(keys) == len(set(keys)), "an episode fired twice"
    for result in results:
        assert result.fired_at >= result.key.due_at, "fired before its due instant"
    for key, raw in seen:
        due = oracle_due(TABLE.by_name(key.rule), raw)
        assert due is not None, f"{key.rule} fired while its condition did not hold: {raw}"
        assert iso(due) == iso(datetime(1970, 1, 1, tzinfo=due.tzinfo)
                               + timedelta(microseconds=key.due_at)), "due instant drifted"
    # Firing order: by fired instant, never back in time.
    instants = [r.fired_at for r in results]
    assert instants == sorted(instants)


@settings(max_examples=100, deadline=None)
@given(lifecycles())
def test_same_input_same_output(events) -> None:
    first, _ = run(events)
    second, _ = run(events)
    assert [(r.key, r.fired_at, r.outcome) for r in first] == \
        [(r.key, r.fired_at, r.outcome) for r in second]


@settings(max_examples=100, deadline=None)
@given(lifecycles())
def test_engine_counters_match_the_heap(events) -> None:
    replay = Replay(TABLE)

    async def go():
        from listener.changes import change_from_payload
        for e in events:
            await replay.apply(change_from_payload(e, require_at=True))
            expected = sum(len(replay.engine.pending(s)) for s in replay.engine.sessions.values())
            assert replay.engine.armed == expected
        await replay.finish(None)
        assert replay.engine.armed == 0

    asyncio.run(go())


def test_output_is_json_lines() -> None:
    from listener.instants import parse_instant
    from listener.replay import run_replay
    out = io.StringIO()
    # A pending request nobody takes: it expires, so replay must write lines.
    asyncio.run(run_replay([json.dumps(event(T0, "INSERT", row()))], TABLE, out, io.StringIO()))
    lines = out.getvalue().splitlines()
    assert lines, "replay wrote nothing"
    for line in lines:
        action = json.loads(line)
        assert isinstance(action, dict), line
        assert {"at", "rule", "session_id", "due_at"} <= action.keys(), line
        assert action["session_id"] == "s1" and action["rule"] in {r.name for r in TABLE.rules}, line
        assert parse_instant(action["at"]) >= parse_instant(action["due_at"]), line
        assert ("status" in action) == ("reason" in action), line
