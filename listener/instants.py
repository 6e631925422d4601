"""Instants are integers: microseconds since the Unix epoch, UTC.

Integers compare and add exactly, hash cheaply and cost less memory than
datetime objects; they become datetimes only at the edges (logs, JSON, SQL).
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

Instant = int
SECOND: int = 1_000_000
MINUTE: int = 60 * SECOND
HOUR: int = 60 * MINUTE
DAY: int = 24 * HOUR

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Instants beyond this are treated as bad input: a year-9999 `expires_at` is a
# typo or a sentinel, not a deadline to hold in memory.
MAX_INSTANT: Instant = int((datetime(2200, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds()) * SECOND


class BadInstant(ValueError):
    pass


def parse_instant(value: object) -> Instant | None:
    """ISO 8601 text (or a datetime) to an instant; None stays None.

    A value without a zone is taken as UTC, as PostgreSQL `timestamp` columns
    and hand-written logs mean it. Raises BadInstant on anything else.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise BadInstant(f"unparsable timestamp {value!r}") from None
    else:
        raise BadInstant(f"timestamp of type {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    instant = (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds
    if not -MAX_INSTANT < instant < MAX_INSTANT:
        raise BadInstant(f"timestamp out of range {value!r}")
    return instant


def to_datetime(instant: Instant) -> datetime:
    from datetime import timedelta

    return _EPOCH + timedelta(microseconds=instant)


def format_instant(instant: Instant) -> str:
    """RFC 3339 UTC with a Z; microseconds only when there are some."""
    dt = to_datetime(instant)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 1000, "s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY}
DURATION_FORMS = "a number with a unit s, m, h or d (for example 90s, 5m, 2h, 1d), or off"


def parse_duration(text: str) -> int:
    """'5m' -> microseconds. Raises ValueError naming the accepted forms."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use {DURATION_FORMS}")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def format_duration(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", SECOND)):
        if micros >= size and micros % size == 0:
            return f"{sign}{micros // size}{unit}"
    if micros % 1000 == 0:
        return f"{sign}{micros // 1000}ms"
    return f"{sign}{micros / SECOND:g}s"
