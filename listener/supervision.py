"""The error boundary of the daemon's parts.

A part (intake, timers, reconcile, catch-up, lease renewal) runs under
`supervise`: a StoreUnavailable marks the database unreachable and the part
retries with backoff; any other exception is a bug, logged once per occurrence
with its traceback and counted, and the part restarts with backoff. A bug
never turns the database "unreachable", and a flaky database never reads as a bug.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import structlog

from listener import metrics
from listener.errors import StoreUnavailable, classify_db_error
from listener.retry import Backoff
from listener.ops import Readiness
from listener.store import Fenced

log = structlog.get_logger("listener.daemon")


def unavailable(exc: BaseException) -> bool:
    """A failure that says the database (or the network to it) is away; driver
    errors an adapter did not map are classified here the same way."""
    return isinstance(classify_db_error(exc), StoreUnavailable)


async def supervise(part: str, run: Callable[[], Awaitable[Any]], health: Readiness, *,
                    on_fenced: Callable[[Fenced], None],
                    backoff: Backoff | None = None) -> None:
    """Run `run` until it returns; restart it after a failure, with backoff."""
    backoff = backoff or Backoff(0.2, 10.0)
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Fenced as exc:
            on_fenced(exc)
            return
        except Exception as exc:  # noqa: BLE001 - the boundary: classify, log, restart
            if unavailable(exc):
                health.store_down(exc)
                log.warning("store_unavailable", part=part, error=str(exc)[:300])
            else:
                metrics.BUGS.labels(part).inc()
                log.exception("bug", part=part, error=repr(exc)[:300])
            await backoff.sleep(exc)
