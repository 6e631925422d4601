"""The command line: exit codes, error messages, the rules table."""
from __future__ import annotations

from listener.rules import load_rules

import os
import subprocess
import sys
from pathlib import Path


def listener(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RULE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "listener", *args], capture_output=True,
                          text=True, env=full_env, input=stdin, timeout=60)


def test_unreadable_file_exits_2() -> None:
    result = listener("replay", "/nonexistent/file.jsonl")
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_all_lines_bad_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    result = listener("replay", str(bad))
    assert result.returncode == 1
    assert "line 1:" in result.stderr and "line 2:" in result.stderr


def test_some_lines_bad_exits_0(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('nope\n{"at": "2026-03-02T10:00:00Z", "type": "INSERT", '
                     '"record": {"id": "x", "status": "pending"}}\n')
    result = listener("replay", str(mixed))
    assert result.returncode == 0 and "line 1:" in result.stderr
    assert result.stdout.count("\n") == 2


def test_empty_input_exits_0() -> None:
    result = listener("replay", "-", stdin="")
    assert result.returncode == 0 and result.stdout == ""


def test_bad_until_is_an_error() -> None:
    result = listener("replay", "-", "--until", "tomorrow", stdin="")
    assert result.returncode == 2 and "--until" in result.stderr


def test_bad_override_names_the_variable() -> None:
    result = listener("rules", env={"RULE_MECHANIC_NUDGE": "soon"})
    assert result.returncode == 2
    assert "RULE_MECHANIC_NUDGE" in result.stderr and "5m" in result.stderr


def test_misspelt_rule_is_an_error() -> None:
    result = listener("rules", env={"RULE_MECHANIC_NUGDE": "5m"})
    assert result.returncode == 2 and "names no rule" in result.stderr


def test_bad_time_scale_is_an_error() -> None:
    result = listener("rules", env={"RULES_TIME_SCALE": "0"})
    assert result.returncode == 2 and "RULES_TIME_SCALE" in result.stderr


def test_rules_table_reflects_overrides() -> None:
    result = listener("rules", env={"RULE_MECHANIC_NUDGE": "10m", "RULE_SUMMARY_OVERDUE": "off"})
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    nudge = next(line for line in lines if "mechanic_nudge" in line)
    assert "+ 10m" in nudge and nudge.rstrip().endswith("yes")
    overdue = next(line for line in lines if " summary_overdue " in line)
    assert overdue.rstrip().endswith("no: disabled")
    rules = [line for line in lines if line[:3].strip().isdigit()]
    assert sum(1 for line in rules if line.split()[1] == "sessions") == 14
    assert len(rules) == len(load_rules({}).all_rules) > 14  # the other packs are listed too


def test_bad_max_notify_lateness_is_an_error() -> None:
    result = listener("replay", "-", env={"MAX_NOTIFY_LATENESS": "an hour"}, stdin="")
    assert result.returncode == 2 and "MAX_NOTIFY_LATENESS" in result.stderr


def test_a_lease_shorter_than_a_second_is_an_error() -> None:
    result = listener("run", env={"LEASE_TTL": "500ms", "DATABASE_URL": "postgresql://nowhere/x"})
    assert result.returncode == 2 and "LEASE_TTL must be at least 1s" in result.stderr


def test_replay_reports_a_rows_problems_in_the_same_order_whatever_the_hash_seed() -> None:
    bad = "not a time"
    line = ('{"at": "2026-03-02T10:00:00Z", "type": "INSERT", "table": "sessions", "record": '
            '{"id": "00000000-0000-4000-8000-000000000002", "status": "live", "type": "video", '
            '"plan": "video15", "customer_user_id": null, "mechanic_id": null, '
            f'"created_at": "{bad}", "updated_at": "{bad}", "started_at": "{bad}", '
            f'"ended_at": "{bad}", "scheduled_for": "{bad}", "expires_at": "{bad}", '
            f'"summary_submitted_at": "{bad}", "status_changed_at": "{bad}", '
            '"metadata": {}}}\n')
    outputs = set()
    for seed in ("1", "2", "3", "4", "5", "6"):
        result = listener("replay", "-", env={"PYTHONHASHSEED": seed}, stdin=line)
        assert result.returncode == 0, result.stderr
        outputs.add(result.stderr)
    assert len(outputs) == 1 and outputs.pop().count(bad) >= 2
