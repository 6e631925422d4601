"""Replay throughput (change events per second, one core) and memory per tracked
session. Prints a table, this release's figures next to release 1's; targets:
>= 50,000 events/s, <= 1 KB per session.

    python benchmarks/replay_throughput.py [--sessions 20000] [--repeat 3]

Throughput is CPU time, the best of --repeat replays of the same log, each in a
fresh engine: on a shared machine the other runs' load only ever slows one down.
Release 1's throughput is measured in the same sitting, on the same log, by
release 1's own code taken from git (`--release-1 REV`); machines differ by
several times, so a figure recorded elsewhere is only printed, marked so, when
git or that commit is not at hand.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lifecycles import generate  # noqa: E402
from listener.engine import Engine  # noqa: E402
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402
from listener.rules import load_rules  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RELEASE_1 = "fca1826"
# Release 1 on the development machine (its own README said 10,500 on another):
# printed only when release 1 cannot be measured here.
RELEASE_1_RECORDED_EVENTS_PER_S = "17,200 (recorded on another machine)"
RELEASE_1_BYTES_PER_SESSION = "492 B"
# Replays a log file with whatever `listener` is first on the path: prints the
# best events per second (CPU time) of argv[2] runs, each in a fresh engine,
# and the actions fired. This tree and release 1 are measured by it alike.
REPLAY_RATE = """
import asyncio, gc, io, sys, time
from listener.logs import configure_logging
from listener.replay import run_replay
from listener.rules import load_rules
configure_logging("WARNING")
lines = open(sys.argv[1]).read().splitlines()
best = 0.0
for _ in range(int(sys.argv[2])):
    gc.collect()
    started = time.process_time()
    stats = asyncio.run(run_replay(lines, load_rules({}), io.StringIO(), io.StringIO()))
    best = max(best, len(lines) / (time.process_time() - started))
print(best, stats.actions)
"""


def replay_rate(root: Path, log: Path, repeat: int) -> tuple[float, int]:
    """(best events per second, actions) of the `listener` package under `root`."""
    # Each tree's own defaults: no rule or plan overrides from this shell.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RULE_", "RULES_")) and k != "PLAN_MINUTES"}
    env["PYTHONPATH"] = str(root)
    script = log.with_name("rate.py")
    script.write_text(REPLAY_RATE)
    done = subprocess.run([sys.executable, str(script), str(log), str(repeat)],
                          capture_output=True, text=True, env=env, cwd=log.parent, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"replay under {root} failed:\n{done.stderr[-2000:]}")
    rate, actions = done.stdout.split()[-2:]
    return float(rate), int(actions)


def release_1_rate(log: Path, revision: str, repeat: int) -> str:
    """Release 1's best rate on the same log, from its own code in a temporary
    directory; the recorded figure when git or the commit is not at hand."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "listener"],
                                     capture_output=True, check=True, timeout=60).stdout
            subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return RELEASE_1_RECORDED_EVENTS_PER_S
        try:
            rate, _ = replay_rate(Path(scratch), log, repeat)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return RELEASE_1_RECORDED_EVENTS_PER_S
        return f"{rate:,.0f} ({revision}, this machine)"


def memory_per_session(count: int) -> float:
    lines = generate(count, seed=11)
    # Keep only each session's first change: all of them pending or scheduled, tracked.
    firsts = {}
    for line in lines:
        obj = json.loads(line)
        firsts.setdefault(obj["record"]["id"], obj["record"])
    rows = list(firsts.values())
    from listener.instants import parse_instant
    at = parse_instant("2026-03-02T08:00:00Z")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = Engine(load_rules({}))
    for row in rows:
        engine.upsert("sessions", row, at)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / engine.tracked


def main() -> None:
    configure_logging("WARNING")
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--memory-sessions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--release-1", default=RELEASE_1,
                        help="the commit whose replay is measured beside this tree's")
    args = parser.parse_args()
    lines = generate(args.sessions)
    repeat = max(1, args.repeat)
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "log.jsonl"
        log.write_text("\n".join(lines) + "\n")
        rate, actions = replay_rate(REPO, log, repeat)
        release_1 = release_1_rate(log, args.release_1, repeat)
    per_session = memory_per_session(args.memory_sessions)
    rows = [("measure", "this release", "release 1", "target"),
            ("change events replayed", f"{len(lines):,}", "", ""),
            ("actions fired", f"{actions:,}", "", ""),
            (f"replay throughput (events/s, CPU time, best of {repeat})", f"{rate:,.0f}",
             release_1, ">= 50,000"),
            (f"memory per tracked session ({args.memory_sessions:,} sessions)",
             f"{per_session:,.0f} B", RELEASE_1_BYTES_PER_SESSION, "<= 1,024 B")]
    print(format_table(rows))


if __name__ == "__main__":
    main()
