"""Instants are integers: microseconds since the Unix epoch, UTC.

Integers compare and add exactly, hash cheaply and cost less memory than
datetime objects; they become datetimes only at the edges (logs, JSON, SQL).
"""
from __future__ import annotations

import re
import time
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


_parsed: dict[str, Instant | None] = {}


def parse_instant(value: object) -> Instant | None:
    """ISO 8601 text (or a datetime) to an instant; None stays None.

    A value without a zone is taken as UTC, as PostgreSQL `timestamp` columns
    and hand-written logs mean it. Raises BadInstant on anything else.
    """
    if value is None:
        return None
    if isinstance(value, str):
        # Rows repeat their timestamps on every update: remember recent ones.
        cached = _parsed.get(value)
        if cached is not None:
            return cached
        instant = _instant_of(_datetime_of_text(value), value)
        if len(_parsed) >= 65_536:
            _parsed.clear()
        _parsed[value] = instant
        return instant
    if isinstance(value, datetime):
        return _instant_of(value, value)
    raise BadInstant(f"timestamp of type {type(value).__name__}")


def _datetime_of_text(value: str) -> datetime:
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise BadInstant(f"unparsable timestamp {value!r:.60}") from None


def _instant_of(dt: datetime, original: object) -> Instant:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    instant = (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds
    if not -MAX_INSTANT < instant < MAX_INSTANT:
        raise BadInstant(f"timestamp out of range {original!r:.60}")
    return instant


def to_datetime(instant: Instant) -> datetime:
    from datetime import timedelta

    return _EPOCH + timedelta(microseconds=instant)


_formatted: dict[Instant, str] = {}


def format_instant(instant: Instant) -> str:
    """RFC 3339 UTC with a Z; microseconds only when there are some."""
    text = _formatted.get(instant)
    if text is None:
        if len(_formatted) >= 65_536:
            _formatted.clear()
        text = _formatted[instant] = _format(instant)
    return text


def _format(instant: Instant) -> str:
    seconds, micros = divmod(instant, SECOND)
    t = time.gmtime(seconds)
    text = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
            f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
    return f"{text}.{micros:06d}Z" if micros else text + "Z"


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
