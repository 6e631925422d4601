"""The error boundary of the daemon's parts.

A part (intake, timers, reconcile, catch-up, lease renewal) runs under
`supervise`: a StoreUnavailable marks the database unreachable and the part
retries with backoff; any other exception is a bug, logged once per occurrence
with its traceback and counted, and the part restarts with backoff. A bug
never turns the database "unreachable", and a flaky database never reads as a bug.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Iterable

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


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, part: str,
                          again_after: float = 0.5, give_up_after: float = 10.0) -> None:
    """Cancel `tasks` and wait until they have ended.

    A cancellation can be lost on its way: a library that catches CancelledError
    at the wrong moment (a connection pool handing over a connection just as
    its waiter is cancelled) lets the task run on into its next sleep, and a
    term that waited for it would never end. So a task still running after
    `again_after` is cancelled again, until `give_up_after`; one that outlives
    that is logged and left behind rather than holding up the rest."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while pending:
        _, pending = await asyncio.wait(pending, timeout=again_after)
        if not pending:
            break
        if loop.time() >= deadline:
            log.error("tasks_not_cancelled", part=part,
                      tasks=sorted(task.get_name() for task in pending))
            break
        for task in pending:
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the caller has reported what it needs to
