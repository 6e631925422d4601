"""The worked examples of shared/scenarios, through the real command line."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "scenarios"
NAMES = sorted(p.name[: -len(".events.jsonl")] for p in HERE.glob("*.events.jsonl"))
KEYS = ("rule", "session_id", "status", "reason")


def normalise(lines: list[str]) -> list[tuple]:
    out = []
    for line in filter(str.strip, lines):
        obj = json.loads(line)
        when = datetime.fromisoformat(obj["at"].replace("Z", "+00:00")).astimezone(timezone.utc)
        out.append((when,) + tuple(obj.get(k) for k in KEYS) + (bool(obj.get("late")),))
    return sorted(out, key=lambda t: tuple(str(x) for x in t))


def test_there_are_scenarios() -> None:
    assert len(NAMES) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str) -> None:
    meta = json.loads((HERE / f"{name}.meta.json").read_text())
    cmd = [sys.executable, "-m", "listener", "replay", str(HERE / f"{name}.events.jsonl")]
    if meta.get("until"):
        cmd += ["--until", meta["until"]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = (HERE / f"{name}.expected.jsonl").read_text().splitlines()
    assert normalise(result.stdout.splitlines()) == normalise(expected)


def test_replay_reads_stdin() -> None:
    events = (HERE / "nobody-accepts.events.jsonl").read_text()
    result = subprocess.run([sys.executable, "-m", "listener", "replay", "-"], input=events,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert [json.loads(x)["rule"] for x in result.stdout.splitlines()] == [
        "support_unassigned_alert", "request_expiry"]
