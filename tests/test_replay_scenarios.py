"""The worked replay examples in tests/scenarios/, through the real command line.

Per scenario NAME: NAME.events.jsonl, NAME.expected.jsonl and NAME.meta.json
(`until`: passed as --until; `rules`: a rules file beside it, passed as
--rules; `env`: variables for the run). Output is compared as a multiset of
(instant, rule, table, row id, status, reason, late).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "scenarios"
NAMES = sorted(p.name[: -len(".events.jsonl")] for p in HERE.glob("*.events.jsonl"))


def normalise(lines: list[str]) -> list[tuple]:
    out = []
    for line in filter(str.strip, lines):
        obj = json.loads(line)
        when = datetime.fromisoformat(obj["at"].replace("Z", "+00:00")).astimezone(timezone.utc)
        row_id = obj.get("row_id") if obj.get("row_id") is not None else obj.get("session_id")
        out.append((when, obj.get("rule"), obj.get("table") or "sessions", row_id,
                    obj.get("status"), obj.get("reason"), bool(obj.get("late"))))
    return sorted(out, key=lambda t: tuple(str(x) for x in t))


def test_there_are_scenarios() -> None:
    assert len(NAMES) >= 5


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str) -> None:
    meta = json.loads((HERE / f"{name}.meta.json").read_text())
    cmd = [sys.executable, "-m", "listener", "replay", str(HERE / f"{name}.events.jsonl")]
    if meta.get("until"):
        cmd += ["--until", meta["until"]]
    if meta.get("rules"):
        cmd += ["--rules", str(HERE / meta["rules"])]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE_", "RULES_")) and k not in ("PLAN_MINUTES",
                                                                  "MAX_NOTIFY_LATENESS")}
    env.update(meta.get("env") or {})
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    expected = (HERE / f"{name}.expected.jsonl").read_text().splitlines()
    assert normalise(result.stdout.splitlines()) == normalise(expected)
    assert normalise(expected), "a scenario with no expected action proves little"
