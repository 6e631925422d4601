"""`listener demo` end to end: embedded PostgreSQL, simulator, every rule fires."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from listener.rules import load_rules


def test_demo_fires_every_rule(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE", "DATABASE_URL", "SUPABASE", "NEXT_PUBLIC_SUPABASE"))}
    env["RULES_TIME_SCALE"] = "2880"  # twice the demo's own speed: a day in 30 s
    result = subprocess.run([sys.executable, "-m", "listener", "demo", "--timeout", "150"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("max lateness", 1)[1]
    for rule in load_rules({}):
        row = next(line for line in table.splitlines() if line.startswith(rule.name + " "))
        assert int(row.split()[1]) >= 1, row
    emails = [json.loads(p.read_text()) for p in (tmp_path / ".listener/demo-outbox").glob("*.json")]
    assert {e["role"] for e in emails} == {"customer", "mechanic", "support"}
    assert (tmp_path / ".listener/pg").is_dir()
