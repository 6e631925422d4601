"""Instants are integers: microseconds since the Unix epoch, UTC.

Integers compare and add exactly, hash cheaply and cost less memory than
datetime objects; they become datetimes only at the edges (logs, JSON, SQL).
"""
from __future__ import annotations

import functools
import re
import time
from datetime import datetime, timezone

Instant = int
SECOND: int = 1_000_000
MINUTE: int = 60 * SECOND
HOUR: int = 60 * MINUTE
DAY: int = 24 * HOUR

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NAIVE_EPOCH = datetime(1970, 1, 1)
# Instants beyond this are treated as bad input: a year-9999 `expires_at` is a
# typo or a sentinel, not a deadline to hold in memory.
MAX_INSTANT: Instant = int((datetime(2200, 1, 1, tzinfo=timezone.utc) - _EPOCH).total_seconds()) * SECOND


class BadInstant(ValueError):
    """A timestamp that is no instant we act on: unreadable, infinite, or out of range."""


# The longest timestamp PostgreSQL writes is about 42 characters
# ("294276-12-31T23:59:59.999999+05:53:28 BC"); anything longer is garbage.
_MAX_TEXT = 64
_INFINITE = {"infinity", "+infinity", "-infinity"}
_YEAR_BEYOND_9999 = re.compile(r"^\+?\d{5,}-\d")

# Rows repeat their timestamps on every update: recent ones are remembered.
# Bad text is not (the error is raised anew), nor are datetimes.
_REMEMBERED = 65_536


def parse_instant(value: object) -> Instant | None:
    """ISO 8601 / PostgreSQL text (or a datetime) to an instant; None stays None.

    A value without a zone is taken as UTC, as PostgreSQL `timestamp` columns
    and hand-written logs mean it. Raises BadInstant, and nothing else, for
    anything that is not an instant within MAX_INSTANT of the epoch: garbage,
    other types, `infinity` (a deadline at infinity is no deadline), BC dates,
    years Python cannot hold.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return instant_of_text(value)
    if isinstance(value, datetime):
        return _instant_of(value, value)
    raise BadInstant(f"timestamp of type {type(value).__name__}")


@functools.lru_cache(maxsize=_REMEMBERED)
def instant_of_text(value: str) -> Instant:
    """parse_instant for text (never None): what the row parsers call directly."""
    if len(value) <= _MAX_TEXT:
        # The forms PostgreSQL and JSON writers emit ("2026-03-02T08:00:00Z",
        # "2026-03-02 08:00:00.5+00") are read as they are. fromisoformat refuses
        # surrounding blanks, a lowercase z, infinity, BC and years past 9999,
        # so whatever it accepts here the careful reading below would read the same.
        try:
            dt = datetime.fromisoformat(value)
        except (ValueError, OverflowError):
            pass
        else:
            if dt.tzinfo is timezone.utc:
                delta = dt - _EPOCH  # both UTC: plain field arithmetic, no overflow
                instant = (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds
                if not -MAX_INSTANT < instant < MAX_INSTANT:
                    raise BadInstant(f"timestamp out of range {value!r:.60}")
                return instant
            return _instant_of(dt, value)
    return _instant_of(_datetime_of_text(value), value)


def _datetime_of_text(value: str) -> datetime:
    text = value.strip()
    if len(text) > _MAX_TEXT:
        raise BadInstant(f"unparsable timestamp {value!r:.60}")
    if text.lower() in _INFINITE:
        raise BadInstant(f"timestamp {text!r} is no deadline")
    if text.upper().endswith(" BC"):
        raise BadInstant(f"timestamp before the common era {value!r:.60}")
    if _YEAR_BEYOND_9999.match(text):
        raise BadInstant(f"timestamp out of range {value!r:.60}")
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except (ValueError, OverflowError, TypeError):
        raise BadInstant(f"unparsable timestamp {value!r:.60}") from None


def _instant_of(dt: datetime, original: object) -> Instant:
    try:
        offset = dt.utcoffset()
    except Exception as exc:  # noqa: BLE001 - a foreign tzinfo may fail any way it likes
        raise BadInstant(f"timestamp {original!r:.60}: zone offset {type(exc).__name__}") from None
    # Subtract the offset from the fields, never build the UTC datetime, so
    # year 1 or 9999 with an offset cannot overflow.
    delta = dt.replace(tzinfo=None) - _NAIVE_EPOCH
    if offset is not None:
        delta -= offset
    instant = (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds
    if not -MAX_INSTANT < instant < MAX_INSTANT:
        raise BadInstant(f"timestamp out of range {original!r:.60}")
    return instant


def to_datetime(instant: Instant) -> datetime:
    from datetime import timedelta

    return _EPOCH + timedelta(microseconds=instant)


# The text of each minute of a day and of each second of a minute, made once:
# instants formatted are mostly new ones (a timer's due, a change's stamp), so
# joining ready pieces beats both formatting them and remembering the results.
_MINUTE_TEXT = tuple(f"T{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60))
_SECOND_TEXT = tuple(f"{second:02d}" for second in range(60))
_SECOND_Z_TEXT = tuple(f"{second:02d}Z" for second in range(60))


def format_instant(instant: Instant) -> str:
    """RFC 3339 UTC with a Z; microseconds only when there are some."""
    seconds, micros = divmod(instant, SECOND)
    days, second_of_day = divmod(seconds, 86_400)
    minute, second = divmod(second_of_day, 60)
    if micros:
        # str(SECOND + micros) is "1" and the six digits, zeros kept.
        return (_date_text(days) + _MINUTE_TEXT[minute] + _SECOND_TEXT[second] + "."
                + str(SECOND + micros)[1:] + "Z")
    return _date_text(days) + _MINUTE_TEXT[minute] + _SECOND_Z_TEXT[second]


@functools.lru_cache(maxsize=4_096)
def _date_text(days: int) -> str:
    """YYYY-MM-DD of a day counted from the epoch (any year time.gmtime can give)."""
    t = time.gmtime(days * 86_400)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


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
