"""The cyclic garbage collector around loading many long-lived objects.

Loading a million tracked rows creates a few million objects that live as long
as the engine. The collector's full passes re-traverse all of them while they
accumulate (a quarter of the daemon's start-up time) and, once loaded, every
full pass walks them again: a pause of hundreds of milliseconds on the event
loop, which delays the timers due meanwhile. The rows, their states and timers
make no reference cycles (reference counting frees them), so the collector
stays off while they load and then leaves them alone (`gc.freeze`) until the
engine holding them is dropped.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator

_pauses = 0
_was_enabled = True


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The collector off inside, as it was before once the last pause ends
    (pauses nest: two daemons in one process may load at once)."""
    global _pauses, _was_enabled
    if _pauses == 0:
        _was_enabled = gc.isenabled()
        gc.disable()
    _pauses += 1
    try:
        yield
    finally:
        _pauses -= 1
        if _pauses == 0 and _was_enabled:
            gc.enable()


def keep_loaded() -> None:
    """Every object alive now is left out of later collections: the loaded
    rows are never traversed again, and a full pass walks only what came after."""
    gc.freeze()


def release_loaded() -> None:
    """The objects `keep_loaded` set aside are collectable again (the engine
    that held them is dropped: anything cyclic among them can now be freed)."""
    gc.unfreeze()


def age_survivors() -> None:
    """Every object alive now joins the oldest generation without a traversal.

    After a pause, all that was allocated meanwhile is still in the youngest
    generation: the first collection once the collector is back would traverse
    all of it to find nothing. Freezing and unfreezing moves it in one step;
    reference counting frees it as before."""
    gc.freeze()
    gc.unfreeze()
