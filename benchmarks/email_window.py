"""What the mailer's grouping window costs and buys. Prints a table.

    python benchmarks/email_window.py [--windows 0,5,20,50,100]

For each window (ms), against the local Resend stand-in at 5 requests/s:
- alone: one action (one email) at a time, idle mailer: median ask-to-sent;
- burst: 500 actions (1,000 emails) asked for over 200 ms, as a due second's
  claims come out of the engine: time until all are sent, p99 ask-to-sent,
  requests made;
- trickle: 40 actions, one every 25 ms: requests made, mean ask-to-sent.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402

from listener.adapters.email_resend import ResendSender  # noqa: E402
from listener.effects import OutgoingEmail  # noqa: E402
from listener.mailer import Mailer, Member  # noqa: E402
from listener.tables import format_table  # noqa: E402
from tests.servers.resend_server import ResendServer  # noqa: E402

KEY = "re_bench_window"


def action(n: int, run: str) -> tuple[Member, list[OutgoingEmail]]:
    sid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run}/{n}"))
    member = Member("scheduled_reminder_1h", "sessions", sid, "2026-03-02T10:00:00Z")
    email = OutgoingEmail(
        to=f"c{n}@example.com", sender="The Auto Doctor <noreply@example.com>",
        subject=f"Session {sid[:8]} starts in 1 hour", html="<p>Soon</p>", text="Soon",
        idempotency_key=f"listener/scheduled_reminder_1h/{sid}/2026-03-02T10:00:00Z/customer",
        rule=member.rule, session_id=sid, role="customer")
    return member, [email]


async def timed(mailer: Mailer, member: Member, emails: list[OutgoingEmail],
                delay: float, lateness: list[float]) -> None:
    await asyncio.sleep(delay)
    t0 = time.monotonic()
    result = await mailer.send(member, emails)
    assert result == [None] * len(emails), result
    lateness.append(time.monotonic() - t0)


async def measure(window_ms: float) -> list[str]:
    with ResendServer(KEY, rate_limit=5) as server:
        sender = ResendSender(KEY, server.url)
        mailer = Mailer(sender, rate_per_second=5.0, batch_window=window_ms / 1000)
        run = f"w{window_ms}-{time.time()}"
        # alone
        alone: list[float] = []
        for n in range(5):
            await timed(mailer, *action(n, run + "a"), 0.0, alone)
            await asyncio.sleep(0.45)
        # burst: 500 actions x 2 emails over 200 ms
        await asyncio.sleep(1.1)
        server.reset()
        burst: list[float] = []
        t0 = time.monotonic()
        jobs = []
        for n in range(500):
            member, [email] = action(n, run + "b")
            other = OutgoingEmail(**{**{f: getattr(email, f) for f in email.__dataclass_fields__},
                                     "to": f"m{n}@example.com", "role": "mechanic",
                                     "idempotency_key": email.idempotency_key[:-8] + "mechanic"})
            jobs.append(timed(mailer, member, [email, other], 0.2 * n / 500, burst))
        await asyncio.gather(*jobs)
        burst_all = time.monotonic() - t0
        burst_requests = len(server.requests)
        assert len(server.delivered) == 1000 and not server.duplicates()
        # trickle
        await asyncio.sleep(1.1)
        server.reset()
        trickle: list[float] = []
        await asyncio.gather(*(timed(mailer, *action(n, run + "t"), 0.025 * n, trickle)
                               for n in range(40)))
        trickle_requests = len(server.requests)
        await mailer.aclose()
        await sender.aclose()
    p99 = statistics.quantiles(burst, n=100)[98]
    return [f"{window_ms:g}", f"{statistics.median(alone) * 1000:.1f}",
            f"{burst_all:.2f}", f"{p99:.2f}", str(burst_requests),
            f"{statistics.mean(trickle) * 1000:.0f}", str(trickle_requests)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="0,5,20,50,100")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rows = [["window ms", "alone median ms", "burst all s", "burst p99 s", "burst requests",
             "trickle mean ms", "trickle requests"]]
    for window in (float(w) for w in args.windows.split(",")):
        rows.append(await measure(window))
    print(format_table(rows, numbers_right=True))


if __name__ == "__main__":
    asyncio.run(main())
