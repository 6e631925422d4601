"""`listener demo` end to end: embedded PostgreSQL, the app's own writes, every
active rule of every pack fires; then `listener report` in the same folder reads
what the demo wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from listener.rules import load_rules


def test_demo_fires_every_active_rule_and_the_report_shows_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE", "DATABASE_URL", "SUPABASE", "NEXT_PUBLIC_SUPABASE"))}
    env["RULES_TIME_SCALE"] = "2880"  # twice the demo's own speed: a day in 30 s
    result = subprocess.run([sys.executable, "-m", "listener", "demo", "--timeout", "150"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("max lateness", 1)[1].splitlines()
    fired: dict[str, int] = {}
    for rule in load_rules({}).all_rules:
        row = next(line for line in table if f" {rule.name} " in f" {line} ")
        columns = row.split()
        fired[rule.name] = int(columns[3])
        if rule.enabled and "inactive:" not in row:
            assert fired[rule.name] >= 1, row
        else:
            assert fired[rule.name] == 0, row
    # Every pack with an active rule played: not only sessions.
    assert sum(n for name, n in fired.items() if not name.startswith(("mechanic_nudge",))) > 20
    assert fired["reservation_expiry"] >= 1 and fired["rfq_expiry"] >= 1
    emails = [json.loads(p.read_text())
              for p in (tmp_path / ".listener/demo-outbox").glob("*.json")]
    assert {e["role"] for e in emails} >= {"customer", "mechanic", "support"}
    assert (tmp_path / ".listener/pg").is_dir()

    # The report reads the embedded database the demo wrote to, with no configuration.
    report = subprocess.run([sys.executable, "-m", "listener", "report", "--format", "json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert report.returncode == 0, report.stderr[-3000:]
    figures = json.loads(report.stdout)
    counted = {r["rule"]: sum(r["outcomes"].values()) for r in figures["rules"]}
    for name, n in fired.items():
        if n:
            assert counted.get(name, 0) >= n, (name, n, counted)
