"""Replay throughput (change events per second, one core) and memory per tracked
session. Prints a table, this release's figures next to release 1's; targets:
>= 50,000 events/s, <= 1 KB per session.

    python benchmarks/replay_throughput.py [--sessions 20000] [--repeat 3]

Throughput is CPU time, the best of --repeat replays of the same log, each in a
fresh engine: on a shared machine the other runs' load only ever slows one down.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import io
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.lifecycles import generate  # noqa: E402
from listener.engine import Engine  # noqa: E402
from listener.logs import configure_logging  # noqa: E402
from listener.tables import format_table  # noqa: E402
from listener.replay import run_replay  # noqa: E402
from listener.rules import load_rules  # noqa: E402

# Release 1 (commit fca1826) on the same 2-core machine, in the same sitting as
# the figures the README gives for this release (its own README said 10,500).
RELEASE_1_EVENTS_PER_S = "17,200"
RELEASE_1_BYTES_PER_SESSION = "492 B"


def throughput(lines: list[str]) -> tuple[float, int]:
    out = io.StringIO()
    gc.collect()
    started = time.process_time()
    stats = asyncio.run(run_replay(lines, load_rules({}), out, io.StringIO()))
    elapsed = time.process_time() - started
    return len(lines) / elapsed, stats.actions


def memory_per_session(count: int) -> float:
    lines = generate(count, seed=11)
    import json
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
    args = parser.parse_args()
    lines = generate(args.sessions)
    runs = [throughput(lines) for _ in range(max(1, args.repeat))]
    rate = max(r for r, _ in runs)
    actions = runs[0][1]
    per_session = memory_per_session(args.memory_sessions)
    rows = [("measure", "this release", "release 1", "target"),
            ("change events replayed", f"{len(lines):,}", "", ""),
            ("actions fired", f"{actions:,}", "", ""),
            (f"replay throughput (events/s, CPU time, best of {len(runs)})", f"{rate:,.0f}",
             RELEASE_1_EVENTS_PER_S, ">= 50,000"),
            (f"memory per tracked session ({args.memory_sessions:,} sessions)",
             f"{per_session:,.0f} B", RELEASE_1_BYTES_PER_SESSION, "<= 1,024 B")]
    print(format_table(rows))


if __name__ == "__main__":
    main()
