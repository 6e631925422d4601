"""Rule 8's plan end, on virtual time: the later of expires_at and started_at +
PLAN_MINUTES[plan] + the session's extension minutes; no computed end for an
unknown or null plan (the 3-hour limit still applies)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import MECH, at, event, extension, extension_event, fired, replay, row

SCENARIOS = Path(__file__).parent / "scenarios"


def live(sid: str = "s1", plan: str | None = "chat10", **fields) -> dict:
    return row(sid, "live", plan=plan, started_at=at(0), **fields)


def plan_lines(lines: list[dict]) -> list[tuple[float, str, str]]:
    return [(minutes, rule, line["row_id"]) for (minutes, rule), line in zip(fired(lines), lines)
            if rule in ("plan_time_expiry", "auto_end_max_duration")]


def test_the_plan_alone_ends_a_session_without_expires_at() -> None:
    lines, _ = replay([event(at(0), "INSERT", live(plan="video15"))])
    assert plan_lines(lines) == [(45, "plan_time_expiry", "s1")]
    assert (lines[0]["status"], lines[0]["reason"]) == ("completed", "plan_time_elapsed")


def test_the_later_of_expires_at_and_the_plan_end_wins_both_ways() -> None:
    lines, _ = replay([event(at(0), "INSERT", live("early", expires_at=at(10))),
                       event(at(0), "INSERT", live("late", expires_at=at(50)))])
    assert plan_lines(lines) == [(30, "plan_time_expiry", "early"),
                                 (50, "plan_time_expiry", "late")]


def test_a_null_plan_keeps_release_one_behaviour() -> None:
    lines, err = replay([event(at(0), "INSERT", live("paid", plan=None, expires_at=at(20))),
                         event(at(0), "INSERT", live("unpaid", plan=None))])
    assert plan_lines(lines) == [(20, "plan_time_expiry", "paid"),
                                 (180, "auto_end_max_duration", "unpaid")]
    assert "not in the rules' map" not in err  # null is no value to report


def test_extensions_add_up_move_and_give_back() -> None:
    lines, _ = replay([
        event(at(0), "INSERT", live()),
        extension_event(at(1), "INSERT", extension("x1", "s1", 10)),
        extension_event(at(2), "INSERT", extension("x2", "s1", 20)),   # 10:60
        extension_event(at(3), "UPDATE", extension("x2", "s1", 5)),    # 10:45
        extension_event(at(4), "DELETE", extension("x1", "s1", 10)),   # 10:35
    ])
    assert plan_lines(lines) == [(35, "plan_time_expiry", "s1")]


def test_an_extension_moved_to_another_session() -> None:
    lines, _ = replay([event(at(0), "INSERT", live("a")), event(at(0), "INSERT", live("b")),
                       extension_event(at(1), "INSERT", extension("x", "a", 15)),
                       extension_event(at(2), "UPDATE", extension("x", "b", 15))])
    assert plan_lines(lines) == [(30, "plan_time_expiry", "a"), (45, "plan_time_expiry", "b")]


def test_an_extension_deleted_after_the_original_end_ends_it_at_once() -> None:
    lines, _ = replay([event(at(0), "INSERT", live()),
                       extension_event(at(10), "INSERT", extension("x", "s1", 15)),
                       extension_event(at(40), "DELETE", extension("x", "s1", 15))])
    assert plan_lines(lines) == [(40, "plan_time_expiry", "s1")]
    assert lines[0]["due_at"] == "2026-03-02T10:30:00Z"


def test_an_extension_seen_before_its_session_counts_once_it_arrives() -> None:
    lines, _ = replay([extension_event(at(-5), "INSERT", extension("x", "s1", 15)),
                       event(at(0), "INSERT", live())])
    assert plan_lines(lines) == [(45, "plan_time_expiry", "s1")]


def test_a_session_deleted_and_back_keeps_its_extensions() -> None:
    lines, _ = replay([event(at(0), "INSERT", live()),
                       extension_event(at(1), "INSERT", extension("x", "s1", 15)),
                       event(at(2), "DELETE", live()), event(at(3), "INSERT", live())])
    assert plan_lines(lines) == [(45, "plan_time_expiry", "s1")]


def test_the_apps_too_early_expires_at_never_ends_a_session_early() -> None:
    # The app sets expires_at = started_at + the extension minutes only.
    lines, _ = replay([event(at(0), "INSERT", live(plan="video15")),
                       extension_event(at(20), "INSERT", extension("x", "s1", 10)),
                       event(at(20), "UPDATE", live(plan="video15", expires_at=at(10)))])
    assert plan_lines(lines) == [(55, "plan_time_expiry", "s1")]


def test_an_unknown_plan_gives_no_end_and_is_reported_once() -> None:
    lines, err = replay([event(at(0), "INSERT", live("a", plan="gold")),
                         event(at(0), "INSERT", live("b", plan="gold")),
                         extension_event(at(1), "INSERT", extension("x", "a", 15))])
    assert plan_lines(lines) == [(180, "auto_end_max_duration", "a"),
                                 (180, "auto_end_max_duration", "b")]
    assert err.count("'gold'") == 1 and "sessions.plan" in err


def test_an_unknown_plan_with_expires_at_still_ends_there() -> None:
    lines, _ = replay([event(at(0), "INSERT", live(plan="gold", expires_at=at(40)))])
    assert plan_lines(lines) == [(40, "plan_time_expiry", "s1")]


def test_extensions_beyond_three_hours_lose_to_the_limit() -> None:
    lines, _ = replay([event(at(0), "INSERT", live(plan="diagnostic")),
                       extension_event(at(1), "INSERT", extension("x1", "s1", 90)),
                       extension_event(at(2), "INSERT", extension("x2", "s1", 60))])
    assert plan_lines(lines) == [(180, "auto_end_max_duration", "s1")]
    assert lines[0]["reason"] == "max_duration_exceeded"


def test_the_plan_end_tied_with_the_limit_goes_by_table_order() -> None:
    # Tied at 13:00: table order puts the 3-hour limit first; it ends the
    # session, and plan time, re-checked, no longer applies.
    lines, _ = replay([event(at(0), "INSERT", live(plan="diagnostic")),
                       extension_event(at(1), "INSERT", extension("x", "s1", 120))])
    assert plan_lines(lines) == [(180, "auto_end_max_duration", "s1")]


def test_plan_minutes_replaces_the_map() -> None:
    env = {"PLAN_MINUTES": "chat10=20"}
    lines, err = replay([event(at(0), "INSERT", live("a")),
                         event(at(0), "INSERT", live("b", plan="video15"))], env)
    assert plan_lines(lines) == [(20, "plan_time_expiry", "a"), (180, "auto_end_max_duration", "b")]
    assert "'video15'" in err


def test_time_scale_divides_plan_and_extension_minutes() -> None:
    lines, _ = replay([event(at(0), "INSERT", live()),
                       extension_event(at(0), "INSERT", extension("x", "s1", 15))],
                      {"RULES_TIME_SCALE": "60"})
    assert plan_lines(lines) == [(45 / 60, "plan_time_expiry", "s1")]


def test_reconnecting_sessions_end_by_the_plan_too() -> None:
    lines, _ = replay([event(at(0), "INSERT", live()),
                       event(at(10), "UPDATE", row("s1", "reconnecting", plan="chat10",
                                                   started_at=at(0), mechanic_id=MECH))])
    assert ("plan_time_expiry", 30.0) in [(rule, m) for m, rule in fired(lines)]


def test_a_bad_extension_is_reported_and_counts_nothing() -> None:
    lines, err = replay([event(at(0), "INSERT", live()),
                         extension_event(at(1), "INSERT", extension("x1", "s1", "fifteen")),
                         extension_event(at(1), "INSERT", extension("x2", "s1", 5))])
    assert plan_lines(lines) == [(35, "plan_time_expiry", "s1")]
    assert "session_extensions x1" in err and "minutes" in err


def test_the_command_line_names_an_unknown_plan_once() -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE_", "RULES_")) and k != "PLAN_MINUTES"}
    result = subprocess.run(
        [sys.executable, "-m", "listener", "replay",
         str(SCENARIOS / "plan-end-unknown-plan.events.jsonl")],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("'gold'") == 1, result.stderr
    assert result.stdout.count("auto_end_max_duration") == 2
